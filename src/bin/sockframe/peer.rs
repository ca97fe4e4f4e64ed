//! Options every client subcommand shares (`connect`, `send`, `request`): the protocol to
//! speak, the token, the name.

use bytes::Bytes;
use sockframe::Mode;
use sockframe::client::ClientConfig;

/// The protocol a client subcommand speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// The sockframe protocol: handshake, typed messages, requests, heartbeats, tokens.
    Sockframe,
    /// The tutorial's plain framing, to talk to the tutorial's own server.
    Tutorial,
}

/// Client options shared by `connect`, `send` and `request`.
#[derive(Debug, clap::Args)]
pub struct PeerArgs {
    /// Protocol to speak
    #[arg(long, value_enum, default_value_t = Protocol::Sockframe)]
    protocol: Protocol,
    /// Token for a server that requires one (better given through the environment, where
    /// other users cannot see it in the process list)
    #[arg(
        long,
        env = "SOCKFRAME_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Name shown in the server's client list
    #[arg(long, value_name = "NAME", default_value = "sockframe-cli")]
    name: String,
}

impl PeerArgs {
    /// Sets the protocol, token and name on `config`.
    pub fn apply(&self, config: &mut ClientConfig) {
        config.protocol = match self.protocol {
            Protocol::Sockframe => Mode::Sockframe,
            Protocol::Tutorial => Mode::Tutorial,
        };
        config.token = self.token.clone().map(Bytes::from);
        config.name = self.name.clone();
    }
}
