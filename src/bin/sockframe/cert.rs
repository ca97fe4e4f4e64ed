//! `sockframe cert`: creates a local CA, a server certificate and a client certificate, so
//! that a person goes from nothing to an encrypted connection in three commands.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Arguments of `sockframe cert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write ca.pem, server.pem, server-key.pem, client.pem, client-key.pem
    /// (and ca-key.pem, to sign more later)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A DNS name or IP address the server certificate is valid for (repeatable)
    /// [default: localhost, 127.0.0.1, ::1]
    #[arg(long = "name", value_name = "HOST")]
    names: Vec<String>,
    /// Name in the client certificate (shown by the server for mutual TLS)
    #[arg(long, value_name = "NAME", default_value = "sockframe-client")]
    client_name: String,
    /// Replace files that exist
    #[arg(long)]
    force: bool,
}

/// Writes the files and prints how to use them.
pub fn run(args: Args) -> Result<()> {
    let names = if args.names.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    } else {
        args.names
    };
    let generated = sockframe::tls::generate(&names, &args.client_name)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("failed to create {}", args.out.display()))?;
    let files = [
        ("ca.pem", &generated.ca_cert, false),
        ("ca-key.pem", &generated.ca_key, true),
        ("server.pem", &generated.server_cert, false),
        ("server-key.pem", &generated.server_key, true),
        ("client.pem", &generated.client_cert, false),
        ("client-key.pem", &generated.client_key, true),
    ];
    if !args.force
        && let Some((name, _, _)) = files
            .iter()
            .find(|(name, _, _)| args.out.join(name).exists())
    {
        bail!(
            "{} exists; use --force to replace the certificates in {}",
            args.out.join(name).display(),
            args.out.display()
        );
    }
    for (name, pem, secret) in files {
        write(&args.out.join(name), pem, secret)?;
    }
    let dir = args.out.display();
    eprintln!(
        "wrote a CA, a server certificate for {} and a client certificate to {dir}",
        names.join(", ")
    );
    eprintln!("  sockframe serve --tls-cert {dir}/server.pem --tls-key {dir}/server-key.pem");
    eprintln!("  sockframe connect --ca {dir}/ca.pem 127.0.0.1:1234");
    Ok(())
}

/// Writes one file; private keys readable by the owner only.
fn write(path: &Path, contents: &str, secret: bool) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    use std::io::Write;
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .with_context(|| format!("failed to write {}", path.display()))
}
