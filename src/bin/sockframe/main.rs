//! The `sockframe` command-line tool.
fn main() {}
