//! Every gRPC port serves its service, `grpc.health.v1.Health` and server reflection to a
//! client that holds only the vault CA (what `grpcurl -cacert` does).
use ferry::up::GRPC_COMPONENTS;
use ferry_mesh::{ClientTls, Component};
use ferry_tests::*;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

fn service_name(c: Component) -> &'static str {
    match c {
        Component::Registry => "ferry.registry.v1.Registry",
        Component::Scheduler => "ferry.scheduler.v1.Scheduler",
        Component::Ingest => "ferry.ingest.v1.Ingest",
        Component::StorageWriter => "ferry.storage.v1.StorageWriter",
        _ => "ferry.failover.v1.Failover",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_port_lists_its_service_health_and_reflection() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let ca_only = ClientTls {
        ca_pem: std::fs::read_to_string(&t.ctl.cfg.tls.ca_cert)?,
        identity: None,
    };
    for c in GRPC_COMPONENTS {
        let ch = ferry_mesh::connect(&t.ctl.cfg.endpoint(c), &ca_only).await?;
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(ch.clone())
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await?
            .into_inner();
        let resp = stream
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no reflection answer from {c}"))?;
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            anyhow::bail!("{c}: unexpected reflection answer");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            service_name(c),
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{c} lists {want}: {names:?}"
            );
        }
        let health = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: service_name(c).into(),
            })
            .await?;
        assert_eq!(
            health.into_inner().status,
            ServingStatus::Serving as i32,
            "{c} serving"
        );
    }
    // A Ferry RPC without credentials is refused, with a reason.
    let ch = ferry_mesh::connect(&t.ctl.cfg.endpoint(Component::Registry), &ca_only).await?;
    let err = ferry_proto::registry::v1::registry_client::RegistryClient::new(ch)
        .list_vms(ferry_proto::registry::v1::ListVmsRequest {})
        .await
        .expect_err("anonymous callers are refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // The real grpcurl (the test command installs it from PyPI); a missing one fails the test.
    let out = std::process::Command::new("grpcurl")
        .arg("-version")
        .output()
        .map_err(|e| anyhow::anyhow!("grpcurl is required (deploy/test.sh installs it): {e}"))?;
    anyhow::ensure!(out.status.success(), "grpcurl -version failed: {out:?}");
    {
        {
            for c in GRPC_COMPONENTS {
                let addr = t
                    .ctl
                    .cfg
                    .endpoint(c)
                    .trim_start_matches("https://")
                    .to_string();
                let list = run(std::process::Command::new("grpcurl")
                    .arg("-cacert")
                    .arg(&t.ctl.cfg.tls.ca_cert)
                    .arg(&addr)
                    .arg("list"))?;
                assert!(
                    list.contains(service_name(c)) && list.contains("grpc.health.v1.Health"),
                    "{c}: {list}"
                );
                let check = run(std::process::Command::new("grpcurl")
                    .arg("-cacert")
                    .arg(&t.ctl.cfg.tls.ca_cert)
                    .args(["-d", &format!("{{\"service\":\"{}\"}}", service_name(c))])
                    .arg(&addr)
                    .arg("grpc.health.v1.Health/Check"))?;
                assert!(check.contains("SERVING"), "{c}: {check}");
            }
        }
    }
    t.stop().await;
    Ok(())
}
