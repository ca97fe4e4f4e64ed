//! Options every client subcommand shares (`connect`, `send`, `request`): the protocol to
//! speak, the token, the name.

use std::path::PathBuf;

use bytes::Bytes;
use sockframe::Mode;
use sockframe::client::ClientConfig;
use sockframe::tls::{ClientTls, ClientTlsOptions};

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
    /// Connect with TLS, verifying the server against the system's roots and --ca
    #[arg(long)]
    tls: bool,
    /// Also trust this CA certificate (PEM); implies --tls
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Verify the server's certificate against this name instead of the address's host;
    /// implies --tls
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Client certificate (PEM) for servers that require one; needs --key; implies --tls
    #[arg(long, value_name = "PEM", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<PathBuf>,
    /// Do not verify the server's certificate: anyone on the path can read and change the
    /// traffic. For tests with throw-away certificates only; implies --tls
    #[arg(long)]
    insecure: bool,
}

impl PeerArgs {
    /// Sets the protocol, token, name and TLS options on `config`.
    pub fn apply(&self, config: &mut ClientConfig) -> anyhow::Result<()> {
        let tls = self.tls
            || self.ca.is_some()
            || self.server_name.is_some()
            || self.cert.is_some()
            || self.insecure;
        if tls {
            if self.insecure {
                eprintln!(
                    "warning: --insecure: the server's certificate is not verified; anyone on \
                     the path can read and change this connection"
                );
            }
            let options = ClientTlsOptions {
                ca: self.ca.clone(),
                no_system_roots: false,
                insecure: self.insecure,
                identity: self.cert.clone().zip(self.key.clone()),
                server_name: self.server_name.clone(),
            };
            config.tls = Some(ClientTls::new(&options)?);
        }
        config.protocol = match self.protocol {
            Protocol::Sockframe => Mode::Sockframe,
            Protocol::Tutorial => Mode::Tutorial,
        };
        config.token = self.token.clone().map(Bytes::from);
        config.name = self.name.clone();
        Ok(())
    }
}
