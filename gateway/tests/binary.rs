//! The `ferry-gateway` binary: starts from a config file written the way `ferry up` writes it,
//! answers PING over QUIC, and exits cleanly on SIGTERM.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_gateway::client::Uploader;
use ferry_mesh::{Identity, MeshConfig};

#[tokio::test]
async fn binary_serves_ping_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = MeshConfig {
        data_dir: dir.path().to_path_buf(),
        ..MeshConfig::default()
    }
    .finish()
    .unwrap();
    ferry_mesh::vault::bootstrap_vault(&cfg, &[]).unwrap();
    let config_path = dir.path().join("ferry.toml");
    cfg.write_toml(&config_path).unwrap();
    let addr: SocketAddr = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-gateway"))
        .arg("--config")
        .arg(&config_path)
        .arg("--listen")
        .arg(addr.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let ca = ferry_mesh::vault::load_ca(&cfg).unwrap();
    let (cert, key) = ca.issue_client(&Identity::Host("host-a".into())).unwrap();
    let client = ferry_mesh::quic_client_config(&ca.cert_pem(), &cert, &key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let pong = loop {
        let attempt = async {
            let up = Uploader::connect(addr, client.clone()).await?;
            up.ping().await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(ms)) => break ms,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => {
                let _ = child.kill();
                panic!("the gateway binary never answered: {other:?}");
            }
        }
    };
    assert!(pong > 0);

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the gateway binary did not stop on sigterm");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
}
