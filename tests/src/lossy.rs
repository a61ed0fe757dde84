//! A UDP relay that drops a share of the datagrams in each direction: a lossy link between
//! an agent and the gateway on one machine, without touching the loopback device that the
//! other tests share (`tc netem` would).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Datagrams the relay forwarded and dropped, both directions together.
#[derive(Default, Debug)]
pub struct LossCounts {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
}

pub struct LossyRelay {
    /// Where clients send (the gateway address an agent is given instead of the real one).
    pub addr: SocketAddr,
    pub counts: Arc<LossCounts>,
    stop: CancellationToken,
}

/// Drops `per_mille` of every thousand datagrams, deterministically from its seed.
struct Dropper {
    rng: crate::Rng,
    per_mille: u64,
    counts: Arc<LossCounts>,
}

impl Dropper {
    fn drop_next(&mut self) -> bool {
        let drop = self.rng.next_u64() % 1000 < self.per_mille;
        let counter = if drop {
            &self.counts.dropped
        } else {
            &self.counts.forwarded
        };
        counter.fetch_add(1, Ordering::Relaxed);
        drop
    }
}

impl LossyRelay {
    /// Relays to `upstream`, dropping `per_mille` of every thousand datagrams each way.
    pub async fn start(upstream: SocketAddr, per_mille: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(per_mille < 1000, "loss {per_mille}‰ is not in 0-999");
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let counts = Arc::new(LossCounts::default());
        let stop = CancellationToken::new();
        let relay = Self {
            addr,
            counts: counts.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(async move {
            let mut up = Dropper {
                rng: crate::Rng::new(0x9e37_79b9_7f4a_7c15),
                per_mille,
                counts,
            };
            let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, client) = tokio::select! {
                    _ = stop.cancelled() => return,
                    got = front.recv_from(&mut buf) => match got {
                        Ok(got) => got,
                        Err(_) => continue,
                    },
                };
                let back = match clients.get(&client) {
                    Some(s) => s.clone(),
                    None => {
                        let Ok(s) = open_back(upstream, client, &front, &up, &stop).await else {
                            continue;
                        };
                        clients.insert(client, s.clone());
                        s
                    }
                };
                if !up.drop_next() {
                    let _ = back.send(&buf[..n]).await;
                }
            }
        });
        Ok(relay)
    }
}

/// The socket that carries one client's datagrams to `upstream`, and a task relaying the
/// answers back to the client (with its own loss).
async fn open_back(
    upstream: SocketAddr,
    client: SocketAddr,
    front: &Arc<UdpSocket>,
    up: &Dropper,
    stop: &CancellationToken,
) -> anyhow::Result<Arc<UdpSocket>> {
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    back.connect(upstream).await?;
    let mut down = Dropper {
        rng: crate::Rng::new(0x5555_aaaa_5555_aaaa ^ u64::from(client.port())),
        per_mille: up.per_mille,
        counts: up.counts.clone(),
    };
    let (front, from, stop) = (front.clone(), back.clone(), stop.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => return,
                got = from.recv(&mut buf) => match got {
                    Ok(n) => n,
                    // ICMP "refused" from a gateway that is not up: do not spin on it.
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            if !down.drop_next() {
                let _ = front.send_to(&buf[..n], client).await;
            }
        }
    });
    Ok(back)
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
