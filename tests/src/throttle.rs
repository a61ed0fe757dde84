//! A TCP proxy in front of an object server that misbehaves the way loaded cloud storage
//! does: some connections get `503 Slow Down`, `429 Too Many Requests` or `500` for their
//! first request, some are reset before any answer; the rest are forwarded untouched.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct ThrottlingProxy {
    addr: SocketAddr,
    injected: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// What the proxy does to a connection it picks.
const FAULTS: [Option<&str>; 4] = [
    Some("503 Slow Down"),
    Some("429 Too Many Requests"),
    Some("500 Internal Server Error"),
    None, // reset
];

impl ThrottlingProxy {
    /// Proxies to `upstream`; one connection in `every` gets a fault.
    pub async fn start(upstream: SocketAddr, every: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(every >= 2, "every must be at least 2 (got {every})");
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let injected = Arc::new(AtomicU64::new(0));
        let count = injected.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok((conn, _)) = listener.accept().await {
                n += 1;
                let fault = (n % every == 1).then(|| FAULTS[(n / every) as usize % FAULTS.len()]);
                if fault.is_some() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                tokio::spawn(serve(conn, upstream, fault));
            }
        });
        Ok(Self {
            addr,
            injected,
            task,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections answered with an error or reset so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
}

impl Drop for ThrottlingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut conn: TcpStream, upstream: SocketAddr, fault: Option<Option<&str>>) {
    match fault {
        None => {
            if let Ok(mut up) = TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
            }
        }
        Some(None) => {
            // Read a little of the request, then reset: SO_LINGER 0 makes close send RST.
            let _ = conn.read(&mut [0u8; 512]).await;
            let _ = conn.set_zero_linger();
        }
        Some(Some(status)) => {
            let _ = read_head(&mut conn).await;
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nretry-after: 0\r\nconnection: close\r\n\r\n"
            );
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
    }
}

/// Reads up to the end of the request head (the body, if any, is left unread).
async fn read_head(conn: &mut TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(())
}
