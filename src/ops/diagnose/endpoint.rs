//! Where a URL's server listens, and the network probes of it: a TCP connect, and for
//! Redis a plain RESP reply that tells a TLS port from a plain one.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::connection::ConnectionOutcome;

/// Where a URL's server listens.
pub(super) enum Endpoint {
    /// No network: memory, SQLite, a Unix socket, or a scheme `open` will refuse.
    Local,
    /// Host and port pairs (several for a cluster's seed nodes).
    Tcp(Vec<(String, u16)>),
}

/// Where the server of `url` listens. Schemes other than Redis and PostgreSQL need no
/// network (or are refused later by `open`).
pub(super) fn endpoint(url: &str) -> Endpoint {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Endpoint::Local;
    };
    let (default_port, cluster) = match scheme {
        "redis" | "rediss" => (6379, false),
        "redis+cluster" | "rediss+cluster" => (6379, true),
        "postgres" | "postgresql" => (5432, false),
        _ => return Endpoint::Local,
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let query = url.split_once('?').map_or("", |(_, q)| q);
    if default_port == 5432 {
        // `?host=` overrides the URL's host; a path there is a Unix-socket directory.
        if let Some(host) = query
            .split('&')
            .find_map(|p| p.strip_prefix("host="))
            .filter(|h| !h.is_empty())
        {
            if host.starts_with('/') || host.starts_with("%2F") || host.starts_with("%2f") {
                return Endpoint::Local;
            }
            let port = split_host_port(hosts, default_port).1;
            return Endpoint::Tcp(vec![(host.to_owned(), port)]);
        }
    }
    let list: Vec<&str> = if cluster {
        hosts.split(',').filter(|h| !h.is_empty()).collect()
    } else {
        vec![hosts]
    };
    let nodes: Vec<(String, u16)> = list
        .into_iter()
        .map(|h| {
            let (host, port) = split_host_port(h, default_port);
            let host = if host.is_empty() { "localhost" } else { host };
            (host.to_owned(), port)
        })
        .collect();
    if nodes.is_empty() {
        Endpoint::Local
    } else {
        Endpoint::Tcp(nodes)
    }
}

/// `host:port`, `[v6]:port`, `host` or `[v6]`, with the default port when none is given
/// (or it does not parse: `open` reports that later).
pub(super) fn split_host_port(hostport: &str, default_port: u16) -> (&str, u16) {
    if let Some(rest) = hostport.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            let port = after
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(default_port);
            return (host, port);
        }
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().unwrap_or(default_port)),
        _ => (hostport, default_port),
    }
}

/// Resolves `host` and opens a plain TCP connection to one of its addresses within
/// `timeout`. Runs on the blocking pool: the standard resolver has no async form.
pub(super) async fn tcp_probe(
    host: String,
    port: u16,
    timeout: Duration,
) -> std::result::Result<SocketAddr, (ConnectionOutcome, String)> {
    use std::io::ErrorKind;

    if timeout.is_zero() {
        return Err((
            ConnectionOutcome::TimedOut,
            format!("{host}:{port}: no time left"),
        ));
    }
    let target = format!("{host}:{port}");
    let probe = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + timeout;
        let addrs: Vec<SocketAddr> = match (host.as_str(), port).to_socket_addrs() {
            Ok(addrs) => addrs.collect(),
            Err(e) => {
                return Err((
                    ConnectionOutcome::DnsFailed,
                    format!("cannot resolve `{host}`: {e}"),
                ))
            }
        };
        if addrs.is_empty() {
            return Err((
                ConnectionOutcome::DnsFailed,
                format!("`{host}` resolves to no address"),
            ));
        }
        let mut last = (ConnectionOutcome::Other, String::new());
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err((
                    ConnectionOutcome::TimedOut,
                    format!("{addr}: no answer within {timeout:?}"),
                ));
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(_) => return Ok(addr),
                Err(e) => {
                    let outcome = match e.kind() {
                        ErrorKind::ConnectionRefused => ConnectionOutcome::Refused,
                        ErrorKind::TimedOut | ErrorKind::WouldBlock => ConnectionOutcome::TimedOut,
                        _ => ConnectionOutcome::Other,
                    };
                    let detail = match outcome {
                        ConnectionOutcome::TimedOut => {
                            format!("{addr}: no answer within {timeout:?}")
                        }
                        _ => format!("{addr}: {e}"),
                    };
                    last = (outcome, detail);
                }
            }
        }
        Err(last)
    });
    // The resolver may block past the deadline; stop waiting for it then.
    match tokio::time::timeout(timeout + Duration::from_millis(50), probe).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err((ConnectionOutcome::Other, format!("{target}: {e}"))),
        Err(_) => Err((
            ConnectionOutcome::TimedOut,
            format!("{target}: no answer (or name resolution) within {timeout:?}"),
        )),
    }
}

/// Sends a plain-text `PING` to `addr` and returns the first line of the reply if it is
/// RESP (`+PONG`, `-NOAUTH ...`): proof that the port speaks plain Redis. `None` when
/// there is no such reply within `timeout` (a TLS port answers with an alert or closes).
pub(super) async fn plain_resp_reply(addr: SocketAddr, timeout: Duration) -> Option<String> {
    use std::io::{Read, Write};

    if timeout.is_zero() {
        return None;
    }
    let probe = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
        stream.set_read_timeout(Some(timeout)).ok()?;
        stream.set_write_timeout(Some(timeout)).ok()?;
        stream.write_all(b"PING\r\n").ok()?;
        let mut buf = [0u8; 128];
        let n = stream.read(&mut buf).ok()?;
        let reply = String::from_utf8_lossy(&buf[..n]);
        let line = reply.lines().next().unwrap_or("").trim();
        let resp = matches!(line.chars().next(), Some('+' | '-' | '$' | '*' | ':'))
            && line.chars().all(|c| !c.is_control());
        resp.then(|| line.chars().take(60).collect())
    });
    tokio::time::timeout(timeout + Duration::from_millis(50), probe)
        .await
        .ok()?
        .ok()?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_of_each_form() {
        let tcp = |url: &str| match endpoint(url) {
            Endpoint::Tcp(nodes) => nodes,
            Endpoint::Local => Vec::new(),
        };
        assert_eq!(tcp("redis://:pw@h:7000/0"), [("h".to_owned(), 7000)]);
        assert_eq!(tcp("rediss://h"), [("h".to_owned(), 6379)]);
        assert_eq!(tcp("redis://"), [("localhost".to_owned(), 6379)]);
        assert_eq!(
            tcp("redis+cluster://u:p@a:1,b:2"),
            [("a".to_owned(), 1), ("b".to_owned(), 2)]
        );
        assert_eq!(
            tcp("postgres://u:p@[::1]:6000/db"),
            [("::1".to_owned(), 6000)]
        );
        assert_eq!(tcp("postgresql://u@db/x"), [("db".to_owned(), 5432)]);
        assert_eq!(tcp("postgres://u@/x?host=db2"), [("db2".to_owned(), 5432)]);
        assert!(tcp("postgres://u@/x?host=/var/run/postgresql").is_empty());
        assert!(tcp("sqlite::memory:").is_empty());
        assert!(tcp("memory://").is_empty());
    }
}
