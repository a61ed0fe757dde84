//! `ferry-gateway --config D/ferry.toml [--listen ADDR]`: the QUIC ingest gateway.
use std::net::UdpSocket;

use anyhow::Context;
use ferry_mesh::{Component, ComponentArgs};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The gateway listens on UDP (QUIC): the shared command line and config, its own socket.
    let cfg = ComponentArgs::load(Component::Gateway, "Ferry's QUIC ingest gateway.")?;
    let addr = cfg.listen(Component::Gateway);
    let socket = UdpSocket::bind(addr).with_context(|| format!("binding udp {addr}"))?;
    ferry_gateway::run(cfg, socket, ferry_mesh::shutdown_on_signal()).await
}
