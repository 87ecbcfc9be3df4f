//! A TCP proxy in front of a server that can keep one kind of connection out: when
//! armed, a connection that sends a given command (a feed's `LISTEN` or `CLIENT
//! TRACKING`) is cut, so a feed cannot come back while the pool's connections work on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Proxy {
    /// The port to connect to instead of the server's.
    pub port: u16,
    refuse: Arc<AtomicBool>,
    /// The server-side addresses (the proxy's own ends) of connections that sent the
    /// pattern: what the server lists them as.
    marked: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Proxy {
    /// Proxies to `target` (`host:port`), watching for `pattern`.
    pub async fn start(target: String, pattern: &'static [u8]) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let refuse = Arc::new(AtomicBool::new(false));
        let marked = Arc::new(Mutex::new(Vec::new()));
        let (refusing, marking) = (refuse.clone(), marked.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let server = match tokio::net::TcpStream::connect(&target).await {
                    Ok(server) => server,
                    Err(e) => {
                        eprintln!("proxy: cannot reach {target}: {e}");
                        continue;
                    }
                };
                let ours = server.local_addr().unwrap();
                let (refuse, marked) = (refusing.clone(), marking.clone());
                tokio::spawn(async move {
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let upstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_client.read(&mut buf).await?;
                            let sent = &buf[..n];
                            if n == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            if sent.windows(pattern.len()).any(|w| w == pattern) {
                                if refuse.load(Ordering::SeqCst) {
                                    return Ok(());
                                }
                                marked.lock().unwrap().push(ours);
                            }
                            to_server.write_all(sent).await?;
                        }
                    };
                    let downstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_server.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            to_client.write_all(&buf[..n]).await?;
                        }
                    };
                    // Either side ending drops both connections.
                    tokio::select! {
                        _ = upstream => {}
                        _ = downstream => {}
                    }
                });
            }
        });
        Proxy {
            port,
            refuse,
            marked,
        }
    }

    /// While on, a connection that sends the pattern is cut before it reaches the
    /// server.
    pub fn refuse(&self, on: bool) {
        self.refuse.store(on, Ordering::SeqCst);
    }

    /// The server-side addresses of the connections that sent the pattern.
    pub fn marked(&self) -> Vec<SocketAddr> {
        self.marked.lock().unwrap().clone()
    }
}
