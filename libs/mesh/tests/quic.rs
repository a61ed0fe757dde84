//! QUIC with client certificates: a round trip with a vault host certificate, and a client
//! certificate from another vault's CA refused.

use std::net::SocketAddr;

use ferry_mesh::{Identity, VaultCa, quic_client_config, quic_peer_identity, quic_server_config};

struct Gateway {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<Option<Identity>>,
}

/// A gateway that accepts one connection, echoes one bi-stream, and returns the peer.
fn gateway(ca: &VaultCa) -> Gateway {
    let (cert, key) = ca.issue_server(&[]).unwrap();
    let config = quic_server_config(&ca.cert_pem(), &cert, &key).unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server = endpoint.clone();
    let task = tokio::spawn(async move {
        let incoming = server.accept().await?;
        let conn = incoming.await.ok()?;
        let peer = quic_peer_identity(&conn).ok()?;
        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
        let data = recv.read_to_end(1 << 20).await.ok()?;
        send.write_all(&data).await.ok()?;
        send.finish().ok()?;
        // Wait for the client to read the echo and close.
        conn.closed().await;
        Some(peer)
    });
    Gateway {
        endpoint,
        addr,
        task,
    }
}

async fn round_trip(
    client: &quinn::Endpoint,
    addr: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let conn = client
        .connect(addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(payload).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let echo = recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())?;
    conn.close(0u32.into(), b"done");
    Ok(echo)
}

fn client(ca_pem: &str, cert: &str, key: &str) -> quinn::Endpoint {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quic_client_config(ca_pem, cert, key).unwrap());
    endpoint
}

#[tokio::test]
async fn host_certificate_round_trip() {
    let ca = VaultCa::create("v1").unwrap();
    let gw = gateway(&ca);
    let host = Identity::Host("hv-01".into());
    let (cert, key) = ca.issue_client(&host).unwrap();
    let client = client(&ca.cert_pem(), &cert, &key);
    let payload = vec![7u8; 200_000];
    let echo = round_trip(&client, gw.addr, &payload).await.unwrap();
    assert_eq!(echo, payload);
    assert_eq!(gw.task.await.unwrap(), Some(host));
    client.wait_idle().await;
    gw.endpoint.close(0u32.into(), b"bye");
}

#[tokio::test]
async fn foreign_client_certificate_is_refused() {
    let ca = VaultCa::create("v1").unwrap();
    let gw = gateway(&ca);
    let foreign = VaultCa::create("other").unwrap();
    let (cert, key) = foreign
        .issue_client(&Identity::Host("hv-01".into()))
        .unwrap();
    // Trusts the right server, but presents a certificate the gateway does not trust.
    let client = client(&ca.cert_pem(), &cert, &key);
    let outcome = round_trip(&client, gw.addr, b"hello").await;
    assert!(
        outcome.is_err(),
        "a foreign client certificate was accepted"
    );
    assert_eq!(gw.task.await.unwrap(), None);
    gw.endpoint.close(0u32.into(), b"bye");
}

#[tokio::test]
async fn client_refuses_a_foreign_server() {
    let foreign = VaultCa::create("other").unwrap();
    let gw = gateway(&foreign);
    let ca = VaultCa::create("v1").unwrap();
    let (cert, key) = ca.issue_client(&Identity::Host("hv-01".into())).unwrap();
    let client = client(&ca.cert_pem(), &cert, &key);
    assert!(round_trip(&client, gw.addr, b"hello").await.is_err());
    gw.endpoint.close(0u32.into(), b"bye");
}
