//! The open file limit against `--max-conns` (issue 17): every connection is a file
//! descriptor, and a process started with the usual soft limit (1,024 on most Linux
//! distributions) fails to accept well before 10,000 clients, each failure only a log line.
//! So at start a server whose soft limit is too low raises it to the hard limit, as the
//! Go runtime and many servers do, and warns, naming both numbers, when even that is short.

/// Descriptors the server uses besides its clients: the listener, the standard streams,
/// the runtime's epoll and wake-ups, the admin endpoint, a cluster's Redis connections,
/// files being sent or received.
pub const RESERVE: u64 = 64;

/// What [`check`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The soft limit was enough.
    Enough,
    /// The soft limit was raised from the first number to the second, which is enough.
    Raised(u64, u64),
    /// The limit stays at this, too low for `max_conns` (after raising it as far as the
    /// hard limit allows).
    TooLow(u64),
    /// The limit could not be read (or the platform has none).
    Unknown,
}

/// Raises the soft limit on open files to the hard one if it is below what `max_conns`
/// connections need, and logs what it did: a warning naming the limit and `max_conns` when
/// it is still too low.
pub fn check(max_conns: u64) -> Outcome {
    let outcome = raise(max_conns.saturating_add(RESERVE));
    match outcome {
        Outcome::Enough | Outcome::Unknown => {}
        Outcome::Raised(from, to) => {
            tracing::info!(from, to, max_conns, "raised the open file limit");
        }
        Outcome::TooLow(limit) => tracing::warn!(
            limit,
            max_conns,
            "the open file limit ({limit}) is lower than --max-conns ({max_conns}) plus \
             {RESERVE} for the server's own files: accepting fails past about {} \
             connections; raise it (ulimit -n, or LimitNOFILE= under systemd)",
            limit.saturating_sub(RESERVE)
        ),
    }
    outcome
}

#[cfg(unix)]
fn raise(need: u64) -> Outcome {
    use rlimit::Resource;
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        return Outcome::Unknown;
    };
    if soft >= need {
        return Outcome::Enough;
    }
    // Up to the hard limit. That may be refused where the hard limit is "unlimited" but
    // the kernel caps descriptors lower (Linux's `nr_open`, macOS's `maxfilesperproc`):
    // then as far as the connections need, which `increase_nofile_limit` clamps to what
    // the system allows.
    let now = if hard > soft && Resource::NOFILE.set(hard, hard).is_ok() {
        hard
    } else {
        rlimit::increase_nofile_limit(need).unwrap_or(soft)
    };
    if now >= need {
        Outcome::Raised(soft, now)
    } else {
        Outcome::TooLow(now)
    }
}

#[cfg(not(unix))]
fn raise(_need: u64) -> Outcome {
    Outcome::Unknown
}
