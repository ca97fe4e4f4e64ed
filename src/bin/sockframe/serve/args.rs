//! The arguments of `sockframe serve` ([`Args`]) and how they become a [`ServerConfig`].

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use sockframe::server::{ProtocolMode, ServerConfig};

use crate::parse;

/// Arguments of `sockframe serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Read the settings from this TOML file: each key is a flag's name without its dashes
    /// (`max-conns = 1000`, `heartbeat = "5s"`, `discard = true`); flags typed override it
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<std::path::PathBuf>,
    /// Print the effective settings (defaults, file and flags) as TOML and exit; secrets in
    /// force are named, their values shown as <hidden>
    #[arg(long)]
    pub(crate) print_config: bool,
    /// Address to listen on; port 0 lets the OS choose. The address actually bound is printed
    /// on stderr as `listening on ADDR`
    #[arg(long, value_name = "ADDR", default_value_t = ServerConfig::default().bind)]
    bind: SocketAddr,
    /// Largest message accepted or sent, in bytes, optionally with a suffix: KiB, MiB, GiB
    /// (1024-based) or KB, MB, GB [default: 16MiB]
    #[arg(long, value_name = "BYTES", value_parser = frame_size)]
    max_frame: Option<usize>,
    /// Most clients connected at once; more are closed as soon as they are accepted
    #[arg(
        long,
        value_name = "N",
        default_value_t = ServerConfig::default().max_connections as u64,
        value_parser = clap::value_parser!(u64).range(1..),
    )]
    max_conns: u64,
    /// Most clients connected at once from one IP address
    #[arg(
        long,
        value_name = "N",
        default_value_t = ServerConfig::default().max_connections_per_ip as u64,
        value_parser = clap::value_parser!(u64).range(1..),
    )]
    max_conns_per_ip: u64,
    /// Print events and `list` replies as JSON objects, one per line
    #[arg(long)]
    pub(super) json: bool,
    /// Protocols accepted: `auto` tells them apart by the first frame (a hello or not);
    /// `auto` becomes `sockframe` when tokens are required
    #[arg(long, value_enum, default_value_t = ServeProtocol::Auto)]
    protocol: ServeProtocol,
    /// Require a token: a file with one token per line (blank lines ignored). Tokens can also
    /// come from the environment variable SOCKFRAME_TOKENS (comma-separated); never only from
    /// the command line, where other users could read them
    #[arg(long, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Ping sockframe clients this often; a client silent for 3 intervals is disconnected
    /// ("0s" turns pings off)
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse::duration)]
    heartbeat: std::time::Duration,
    /// Disconnect clients that send no message for this long [default: off]
    #[arg(long, value_name = "DURATION", value_parser = parse::duration)]
    idle_timeout: Option<std::time::Duration>,
    /// Disconnect a client whose frame, once begun, is not complete within this long
    /// ("0s" turns the check off)
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse::duration)]
    frame_timeout: std::time::Duration,
    /// Keep the lossless session of a client whose connection dropped this long, for it to
    /// resume without losing a message ("0s" turns sessions off)
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse::duration)]
    session_grace: std::time::Duration,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key. SIGHUP reloads both
    /// files: new connections use the new pair
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS. A client's name in
    /// `list` then comes from its certificate
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    client_ca: Option<std::path::PathBuf>,
    /// Accept files that clients send, into this directory (created if missing). Without
    /// it, file offers are refused
    #[arg(long, value_name = "DIR")]
    save_dir: Option<std::path::PathBuf>,
    /// Largest file accepted with --save-dir, in bytes, optionally with a suffix: KiB, MiB,
    /// GiB or KB, MB, GB [default: 64GiB]
    #[arg(long, value_name = "SIZE", value_parser = parse::size, requires = "save_dir")]
    max_file_size: Option<usize>,
    /// Replace existing files with received ones of the same name (default: refuse them)
    #[arg(long, requires = "save_dir")]
    overwrite: bool,
    /// Benchmark target: count each message and drop it
    #[arg(long, group = "load")]
    pub(super) discard: bool,
    /// A ready test peer: send each message back to its sender, unprinted (a client whose
    /// queue fills up because it does not read is disconnected as a slow consumer), and
    /// answer each request with its own payload
    #[arg(long, group = "load")]
    pub(super) echo: bool,
    /// Benchmark target: send each message to every other client (a client whose queue fills
    /// up is disconnected as a slow consumer)
    #[arg(long, group = "load")]
    pub(super) fanout: bool,
    /// With --discard or --echo: take messages from the event stream, as an application
    /// reading `ServerEvents` does, instead of with a handler in each connection's task
    /// (the library's fastest path, and the default)
    #[arg(long)]
    pub(super) events: bool,
    /// With --discard: count each message as an owned `Message` (`Handler::message`)
    /// instead of borrowing it where it was read (`Handler::message_ref`, the default)
    #[arg(long, requires = "discard", conflicts_with = "events")]
    pub(super) owned: bool,
    /// Serve the admin HTTP endpoint here: Prometheus metrics (/metrics), health (/healthz,
    /// /readyz), a JSON API (/api/clients, /api/stats) and a live dashboard (/). Off by
    /// default; bind a loopback address unless the network is trusted. The address bound is
    /// printed on stderr as `admin on http://ADDR`
    #[cfg(feature = "admin")]
    #[arg(long, value_name = "ADDR")]
    pub(super) admin: Option<SocketAddr>,
    /// Require `Authorization: Bearer TOKEN` on every admin route but /healthz: a file
    /// holding the token (its first non-blank line). The token can also come from the
    /// environment variable SOCKFRAME_ADMIN_TOKEN; never from the command line
    #[cfg(feature = "admin")]
    #[arg(long, value_name = "FILE", requires = "admin")]
    pub(super) admin_token_file: Option<std::path::PathBuf>,
    /// Act as one server with the other nodes using this Redis (redis://HOST:PORT[/DB]):
    /// ids unique across nodes, `send`, `request` and `broadcast` reaching every client,
    /// `list` showing them all. Off by default: a single node needs no Redis
    #[cfg(feature = "cluster")]
    #[arg(long, value_name = "URL")]
    pub(super) cluster: Option<String>,
    /// This node's name in the cluster [default: node-N, N its number]
    #[cfg(feature = "cluster")]
    #[arg(long, value_name = "NAME", requires = "cluster")]
    pub(super) node_id: Option<String>,
}

/// `--protocol` of `serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ServeProtocol {
    /// Both on one port, told apart by the first frame.
    Auto,
    /// Only the tutorial framing.
    Tutorial,
    /// Only the sockframe protocol.
    Sockframe,
}

/// The tokens from `--token-file` and `SOCKFRAME_TOKENS`.
fn load_tokens(file: Option<&std::path::Path>) -> Result<Vec<bytes::Bytes>> {
    let mut tokens = Vec::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the token file {}", path.display()))?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from),
        );
        if tokens.is_empty() {
            bail!("the token file {} holds no token", path.display());
        }
    }
    if let Ok(list) = std::env::var("SOCKFRAME_TOKENS") {
        tokens.extend(
            list.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from),
        );
    }
    Ok(tokens.into_iter().map(bytes::Bytes::from).collect())
}

/// `--max-frame`: a size the tutorial's signed 32-bit length can express.
fn frame_size(s: &str) -> Result<usize, String> {
    let max = i32::MAX as usize;
    match parse::size(s)? {
        n if n > max => Err(format!(
            "{n} bytes is more than a frame can hold (at most {max}: the length is a signed 32-bit integer)"
        )),
        n => Ok(n),
    }
}

/// The admin token from `--admin-token-file`, else from `SOCKFRAME_ADMIN_TOKEN`.
#[cfg(feature = "admin")]
fn load_admin_token(file: Option<&std::path::Path>) -> Result<Option<String>> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the admin token file {}", path.display()))?;
        return match text.lines().map(str::trim).find(|t| !t.is_empty()) {
            Some(token) => Ok(Some(token.to_string())),
            None => bail!("the admin token file {} holds no token", path.display()),
        };
    }
    Ok(std::env::var("SOCKFRAME_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

impl Args {
    /// Joins the cluster of `--cluster`, if given.
    #[cfg(feature = "cluster")]
    pub(super) async fn join_cluster(
        &self,
    ) -> Result<Option<std::sync::Arc<sockframe::cluster::Cluster>>> {
        let Some(url) = &self.cluster else {
            return Ok(None);
        };
        let mut config = sockframe::cluster::ClusterConfig::new(url.clone());
        config.node = self.node_id.clone();
        Ok(Some(sockframe::cluster::Cluster::connect(config).await?))
    }

    /// The secrets in force (tokens, admin token), by name, for `--print-config`.
    pub(crate) fn secrets(&self) -> Result<Vec<&'static str>> {
        let mut names = Vec::new();
        let tokens = load_tokens(self.token_file.as_deref())?;
        if !tokens.is_empty() {
            names.push(if tokens.len() == 1 {
                "1 client token"
            } else {
                "client tokens"
            });
        }
        #[cfg(feature = "admin")]
        if self.admin.is_some() && load_admin_token(self.admin_token_file.as_deref())?.is_some() {
            names.push("admin token");
        }
        Ok(names)
    }

    /// The admin endpoint's settings, when `--admin` asks for one.
    #[cfg(feature = "admin")]
    pub(super) fn admin_config(&self) -> Result<Option<sockframe::admin::AdminConfig>> {
        let Some(bind) = self.admin else {
            return Ok(None);
        };
        Ok(Some(sockframe::admin::AdminConfig {
            bind: Some(bind),
            token: load_admin_token(self.admin_token_file.as_deref())?,
        }))
    }

    /// The server's settings; creates the `--save-dir` directory and reads the tokens.
    pub(super) fn server_config(&self) -> Result<ServerConfig> {
        let mut config = ServerConfig::new(self.bind);
        if let Some(max) = self.max_frame {
            config.max_frame = max;
        }
        config.max_connections = usize::try_from(self.max_conns).unwrap_or(usize::MAX);
        config.max_connections_per_ip =
            usize::try_from(self.max_conns_per_ip).unwrap_or(usize::MAX);
        config.protocol = match self.protocol {
            ServeProtocol::Auto => ProtocolMode::Auto,
            ServeProtocol::Tutorial => ProtocolMode::Tutorial,
            ServeProtocol::Sockframe => ProtocolMode::Sockframe,
        };
        config.tokens = load_tokens(self.token_file.as_deref())?;
        if !config.tokens.is_empty() && self.protocol == ServeProtocol::Tutorial {
            bail!("tokens need the sockframe protocol; the tutorial framing cannot carry them");
        }
        config.heartbeat = (!self.heartbeat.is_zero()).then(|| sockframe::Heartbeat {
            interval: self.heartbeat,
            ..Default::default()
        });
        config.idle_timeout = self.idle_timeout;
        config.frame_timeout = (!self.frame_timeout.is_zero()).then_some(self.frame_timeout);
        config.session_grace = (!self.session_grace.is_zero()).then_some(self.session_grace);
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let tls = sockframe::tls::ServerTls::from_files(cert, key, self.client_ca.clone())?;
            config.tls = Some(std::sync::Arc::new(tls));
        }
        if let Some(dir) = &self.save_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the save directory {}", dir.display()))?;
            config.transfer.save_dir = Some(dir.clone());
            config.transfer.overwrite = self.overwrite;
            if let Some(max) = self.max_file_size {
                config.transfer.max_file_size = max as u64;
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_frame_fits_a_signed_length() {
        assert_eq!(frame_size("2147483647"), Ok(i32::MAX as usize));
        assert!(frame_size("2GiB").is_err());
        assert_eq!(frame_size("64KiB"), Ok(65536));
    }
}
