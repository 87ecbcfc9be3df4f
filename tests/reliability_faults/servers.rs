//! The servers the fault tests control: a `redis-server` child process that can be
//! killed and restarted on the same port, a listener that accepts and never answers,
//! and a TCP proxy that either forwards to a real server or stalls every byte.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of the test's own, on a free loopback port, killed when dropped (a
/// panicking test included).
///
/// It persists with an append-only file fsynced before each reply (`appendfsync
/// always`): the failover layer assumes the primary keeps what it acknowledged, so a
/// restart must not come back empty (without persistence the writes acknowledged before
/// the crash would exist only in the fallback, as the layer documents).
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one, or returns `None` with a notice when `redis-server` is not installed
    /// (a failure under `CI=true`).
    pub async fn start() -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("redis-server is not on PATH under CI=true: the failover test needs it");
            }
            eprintln!("skipping the Redis kill test: redis-server is not on PATH");
            return None;
        }
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::TempDir::new().unwrap(),
        };
        server.spawn().await;
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// Waits until the server answers PING (not just accepts: it refuses commands while
    /// it loads its append-only file).
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)).await {
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").await.is_ok() {
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await
                    {
                        if buf[..n].starts_with(b"+PONG") {
                            return;
                        }
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown, no final save; open connections are reset by the kernel.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`freeze(true)`) or SIGCONT: a frozen server keeps its sockets open and
    /// answers nothing, as a hung host does; commands sent meanwhile run when it resumes.
    pub fn freeze(&self, frozen: bool) {
        let child = self.child.as_ref().expect("the server runs");
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts it again on the same port, with the same directory (its append-only file).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A listener that accepts every connection and never reads from or writes to it, with
/// the sockets kept open: a server that hangs, as opposed to one that is down.
pub struct HungServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl HungServer {
    pub async fn start() -> HungServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                held.push(socket);
            }
        });
        HungServer {
            addr,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for HungServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy to a real server that can be switched between forwarding and hanging.
/// Hanging, it accepts new connections without connecting them upstream and holds every
/// byte of the existing ones in either direction (the sockets stay open, nothing is
/// reset); forwarding again, held bytes flow on, so a backend sees a server that stalled
/// and came back, not one that dropped its connections.
pub struct Proxy {
    pub addr: SocketAddr,
    hang: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String, hang: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hang = Arc::new(AtomicBool::new(hang));
        let flag = hang.clone();
        // The connections' tasks live in the JoinSet, so aborting this task ends them all.
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                connections.spawn(serve(client, upstream.clone(), flag.clone()));
            }
        });
        Proxy { addr, hang, task }
    }

    pub fn set_hang(&self, hang: bool) {
        self.hang.store(hang, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_while(hang: &AtomicBool) {
    while hang.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn serve(client: TcpStream, upstream: String, hang: Arc<AtomicBool>) {
    wait_while(&hang).await;
    let Ok(server) = TcpStream::connect(upstream.as_str()).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, &hang),
        pump(server_read, client_write, &hang)
    );
}

/// Copies one direction, holding each chunk read while the proxy hangs.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, hang: &AtomicBool) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        wait_while(hang).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The `host:port` of a server URL (`scheme://[user[:password]@]host[:port][/path][?query]`),
/// with `default_port` when it names none.
pub fn host_port(url: &str, default_port: u16) -> String {
    let (_, rest) = url.split_once("://").expect("a URL with a scheme");
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let has_port = match host.rfind(']') {
        Some(end) => host[end..].contains(':'),
        None => host.contains(':'),
    };
    if has_port {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

/// `url` with its `host[:port]` replaced by `addr` (user, path and query kept).
pub fn with_address(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{addr}{tail}", user.unwrap_or_default())
}

/// `url` with query parameters added.
pub fn with_params(url: &str, params: &[(&str, &str)]) -> String {
    let mut url = url.to_owned();
    for (key, value) in params {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("{key}={value}"));
    }
    url
}

#[test]
fn url_helpers() {
    let pg = "postgres://postgres@127.0.0.1:5432/test";
    assert_eq!(host_port(pg, 5432), "127.0.0.1:5432");
    assert_eq!(host_port("redis://localhost", 6379), "localhost:6379");
    assert_eq!(host_port("redis://:pw@[::1]/0", 6379), "[::1]:6379");
    let addr: SocketAddr = "127.0.0.1:4242".parse().unwrap();
    assert_eq!(
        with_address(pg, addr),
        "postgres://postgres@127.0.0.1:4242/test"
    );
    assert_eq!(
        with_address("redis://127.0.0.1:6379", addr),
        "redis://127.0.0.1:4242"
    );
    assert_eq!(
        with_params(pg, &[("schema", "s"), ("application_name", "a")]),
        "postgres://postgres@127.0.0.1:5432/test?schema=s&application_name=a"
    );
}
