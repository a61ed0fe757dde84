//! A real TLS gRPC server on 127.0.0.1:0 with health, reflection and a probe service that
//! reports who the mesh thinks the caller is.

use std::sync::Arc;

use ferry_mesh::{
    Authenticator, CancellationToken, ClientTls, Component, Identity, MeshConfig, Role, ServerTls,
    VaultCa, bootstrap_vault, caller, connect, connect_lazy, load_ca, require_host, require_role,
    require_service, serve, serve_component, serve_with_drain, unimplemented, with_token,
};
use ferry_model::{AuditRecord, AuditResult, AuditSink};
use ferry_proto::scheduler::v1::scheduler_client::SchedulerClient;
use ferry_proto::scheduler::v1::scheduler_server::{Scheduler, SchedulerServer};
use ferry_proto::scheduler::v1::{
    CompleteWorkRequest, CompleteWorkResponse, DispatchRequest, DispatchResponse, ListQueueRequest,
    ListQueueResponse, QueueEntry, RescheduleRequest, RescheduleResponse, WorkItem,
    WorkResultRequest, WorkResultResponse, WorkStreamRequest,
};
use figment::providers::Serialized;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SCHEDULER: &str = "ferry.scheduler.v1.Scheduler";

/// The length of the `error` of the last `complete_work` the probe served: what reached the
/// handler through the layers in front of it.
static ERROR_LEN_SEEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Answers `list_queue` with the caller's description and checks one rule per other RPC.
struct Probe;

#[tonic::async_trait]
impl Scheduler for Probe {
    type WorkStreamStream = tokio_stream::Pending<Result<WorkItem, Status>>;

    /// A stream that never ends and ignores shutdown, as a careless handler would.
    async fn work_stream(
        &self,
        req: Request<WorkStreamRequest>,
    ) -> Result<Response<Self::WorkStreamStream>, Status> {
        if req.get_ref().host_name.is_empty() {
            return Err(unimplemented("work stream without a host"));
        }
        Ok(Response::new(tokio_stream::pending()))
    }

    async fn complete_work(
        &self,
        req: Request<CompleteWorkRequest>,
    ) -> Result<Response<CompleteWorkResponse>, Status> {
        require_host(&req)?;
        ERROR_LEN_SEEN.store(
            req.get_ref().error.len(),
            std::sync::atomic::Ordering::SeqCst,
        );
        Ok(Response::new(CompleteWorkResponse {}))
    }

    async fn dispatch(
        &self,
        req: Request<DispatchRequest>,
    ) -> Result<Response<DispatchResponse>, Status> {
        require_role(&req, Role::Operator)?;
        Ok(Response::new(DispatchResponse {
            work_id: "w1".into(),
        }))
    }

    async fn list_queue(
        &self,
        req: Request<ListQueueRequest>,
    ) -> Result<Response<ListQueueResponse>, Status> {
        Ok(Response::new(ListQueueResponse {
            entries: vec![QueueEntry {
                host_name: caller(&req).to_string(),
                ..Default::default()
            }],
        }))
    }

    async fn reschedule(
        &self,
        req: Request<RescheduleRequest>,
    ) -> Result<Response<RescheduleResponse>, Status> {
        require_service(&req)?;
        Ok(Response::new(RescheduleResponse {}))
    }

    async fn cancel_work(
        &self,
        req: Request<ferry_proto::scheduler::v1::CancelWorkRequest>,
    ) -> Result<Response<ferry_proto::scheduler::v1::CancelWorkResponse>, Status> {
        require_service(&req)?;
        Ok(Response::new(Default::default()))
    }

    async fn join_cut(
        &self,
        req: Request<ferry_proto::scheduler::v1::JoinCutRequest>,
    ) -> Result<Response<ferry_proto::scheduler::v1::JoinCutResponse>, Status> {
        require_host(&req)?;
        Ok(Response::new(Default::default()))
    }

    async fn work_result(
        &self,
        req: Request<WorkResultRequest>,
    ) -> Result<Response<WorkResultResponse>, Status> {
        require_service(&req)?;
        Ok(Response::new(WorkResultResponse::default()))
    }
}

struct Mesh {
    cfg: MeshConfig,
    endpoint: String,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), ferry_mesh::MeshError>>,
    _dir: tempfile::TempDir,
}

async fn start() -> Mesh {
    start_with(None).await
}

/// Collects audit records in memory (the store-backed trail has its own tests in ferry-store).
#[derive(Debug, Default)]
struct Collected(std::sync::Mutex<Vec<AuditRecord>>);

impl AuditSink for Collected {
    fn record(
        &self,
        record: AuditRecord,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        self.0.lock().unwrap().push(record);
        Box::pin(async {})
    }
}

/// The probe server; with `audit`, served by `serve_component` (the audit layer in front)
/// and decoding messages up to 64 MiB as ingest and storage-writer do.
async fn start_with(audit: Option<Arc<dyn AuditSink>>) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = MeshConfig::load(None, Serialized::default("data_dir", dir.path())).unwrap();
    bootstrap_vault(&cfg, &[]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    cfg.set_listen(Component::Scheduler, listener.local_addr().unwrap());
    let auth = Authenticator::with_admin_token(&cfg.admin_token().unwrap())
        .add_token("reader-token", Role::Reader)
        .with_revocation(Arc::new(|host: &str, _serial: &str| host == "removed"));
    let shutdown = CancellationToken::new();
    let server = match audit {
        Some(sink) => {
            let (cfg, auth) = (cfg.clone(), auth.with_audit(sink));
            let svc = SchedulerServer::new(Probe).max_decoding_message_size(64 << 20);
            let shutdown = shutdown.clone();
            tokio::spawn(async move { serve_component(&cfg, listener, &auth, svc, shutdown).await })
        }
        None => {
            let routes = Routes::new(SchedulerServer::with_interceptor(Probe, auth.interceptor()));
            let tls = ServerTls::load(&cfg).unwrap();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { serve(listener, &tls, routes, &[SCHEDULER], shutdown).await })
        }
    };
    Mesh {
        endpoint: cfg.endpoint(Component::Scheduler),
        cfg,
        shutdown,
        server,
        _dir: dir,
    }
}

impl Mesh {
    async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.unwrap().unwrap();
    }

    fn host_tls(&self, name: &str) -> ClientTls {
        let ca = load_ca(&self.cfg).unwrap();
        let (cert, key) = ca.issue_client(&Identity::Host(name.into())).unwrap();
        ClientTls::host(ca.cert_pem(), cert, key)
    }
}

async fn whoami(channel: Channel) -> Result<String, Status> {
    let resp = SchedulerClient::new(channel)
        .list_queue(ListQueueRequest::default())
        .await?;
    Ok(resp.into_inner().entries[0].host_name.clone())
}

#[tokio::test]
async fn health_and_reflection_need_only_the_ca() {
    let mesh = start().await;
    let channel = connect(&mesh.endpoint, &ClientTls::operator(&mesh.cfg).unwrap())
        .await
        .unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in ["", SCHEDULER] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let v1 = reflection::list_v1(channel.clone()).await;
    let v1alpha = reflection::list_v1alpha(channel.clone()).await;
    for services in [&v1, &v1alpha] {
        for name in [
            SCHEDULER,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(services.iter().any(|s| s == name), "{name} in {services:?}");
        }
        // Only what this server runs is listed.
        assert!(!services.iter().any(|s| s == "ferry.registry.v1.Registry"));
    }
    let descriptor = reflection::file_containing_v1(channel.clone(), SCHEDULER).await;
    assert!(!descriptor.is_empty());

    // No credentials: the interceptor lets the call through as anonymous, handlers refuse.
    assert_eq!(whoami(channel.clone()).await.unwrap(), "anonymous");
    let err = SchedulerClient::new(channel)
        .reschedule(RescheduleRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    mesh.stop().await;
}

#[tokio::test]
async fn host_certificate_is_a_host() {
    let mesh = start().await;
    let channel = connect(&mesh.endpoint, &mesh.host_tls("hv-01"))
        .await
        .unwrap();
    assert_eq!(whoami(channel.clone()).await.unwrap(), "host:hv-01");
    let mut client = SchedulerClient::new(channel);
    client
        .complete_work(CompleteWorkRequest::default())
        .await
        .unwrap();
    let err = client
        .dispatch(DispatchRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let removed = connect(&mesh.endpoint, &mesh.host_tls("removed"))
        .await
        .unwrap();
    let err = whoami(removed).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("removed from the vault"),
        "{}",
        err.message()
    );
    mesh.stop().await;
}

#[tokio::test]
async fn service_certificate_is_a_service() {
    let mesh = start().await;
    let channel = connect(&mesh.endpoint, &ClientTls::service(&mesh.cfg).unwrap())
        .await
        .unwrap();
    assert_eq!(whoami(channel.clone()).await.unwrap(), "service:ferry");
    let mut client = SchedulerClient::new(channel);
    client
        .reschedule(RescheduleRequest::default())
        .await
        .unwrap();
    // Services count as admin.
    client.dispatch(DispatchRequest::default()).await.unwrap();
    mesh.stop().await;
}

#[tokio::test]
async fn bearer_tokens_carry_roles() {
    let mesh = start().await;
    let channel = connect(&mesh.endpoint, &ClientTls::operator(&mesh.cfg).unwrap())
        .await
        .unwrap();
    let token = mesh.cfg.admin_token().unwrap();
    let mut admin = SchedulerClient::new(with_token(channel.clone(), &token).unwrap());
    let who = admin.list_queue(ListQueueRequest::default()).await.unwrap();
    assert_eq!(who.into_inner().entries[0].host_name, "token:admin (admin)");
    admin.dispatch(DispatchRequest::default()).await.unwrap();

    let mut reader = SchedulerClient::new(with_token(channel.clone(), "reader-token").unwrap());
    let err = reader
        .dispatch(DispatchRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let mut wrong = SchedulerClient::new(with_token(channel, "not-the-token").unwrap());
    let err = wrong
        .list_queue(ListQueueRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.message().contains("not-the-token"));
    mesh.stop().await;
}

#[tokio::test]
async fn foreign_ca_is_rejected_both_ways() {
    let mesh = start().await;
    let foreign = VaultCa::create("other").unwrap();

    // A client certificate from another vault: the handshake (or the first call) fails.
    let (cert, key) = foreign
        .issue_client(&Identity::Host("hv-01".into()))
        .unwrap();
    let ca_pem = load_ca(&mesh.cfg).unwrap().cert_pem();
    let tls = ClientTls::host(ca_pem, cert, key);
    let outcome = match connect(&mesh.endpoint, &tls).await {
        Ok(channel) => whoami(channel).await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(
        outcome.is_err(),
        "a foreign client certificate was accepted"
    );

    // A client trusting another vault's CA does not trust this server.
    let tls = ClientTls {
        ca_pem: foreign.cert_pem(),
        identity: None,
    };
    let err = connect(&mesh.endpoint, &tls).await.unwrap_err().to_string();
    assert!(err.contains("certificate"), "{err}");
    mesh.stop().await;
}

#[tokio::test]
async fn lazy_channels_connect_on_first_use() {
    let mesh = start().await;
    let tls = ClientTls::service(&mesh.cfg).unwrap();
    let channel = connect_lazy(&mesh.endpoint, &tls).unwrap();
    assert_eq!(whoami(channel).await.unwrap(), "service:ferry");

    // Nothing listens there: creating the channel works, calls fail as unavailable.
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("https://{}", free.local_addr().unwrap());
    drop(free);
    let channel = connect_lazy(&dead, &tls).unwrap();
    assert_eq!(whoami(channel).await.unwrap_err().code(), Code::Unavailable);

    for bad in ["http://127.0.0.1:1", "not a url", "https://"] {
        assert!(connect_lazy(bad, &tls).is_err(), "{bad}");
    }
    mesh.stop().await;
}

#[tokio::test]
async fn shutdown_cuts_off_streams_after_the_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = MeshConfig::load(None, Serialized::default("data_dir", dir.path())).unwrap();
    bootstrap_vault(&cfg, &[]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("https://{}", listener.local_addr().unwrap());
    let auth = Authenticator::default();
    let routes = Routes::new(SchedulerServer::with_interceptor(Probe, auth.interceptor()));
    let tls = ServerTls::load(&cfg).unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let drain = std::time::Duration::from_millis(300);
            serve_with_drain(listener, &tls, routes, &[SCHEDULER], shutdown, drain).await
        }
    });
    let channel = connect(&endpoint, &ClientTls::operator(&cfg).unwrap())
        .await
        .unwrap();
    let stream = SchedulerClient::new(channel)
        .work_stream(WorkStreamRequest {
            host_name: "hv-01".into(),
        })
        .await
        .unwrap()
        .into_inner();
    shutdown.cancel();
    // Generous bound: only guards against hanging forever.
    tokio::time::timeout(std::time::Duration::from_secs(30), server)
        .await
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
    // The stream was open (and never ended) for the whole shutdown.
    drop(stream);
}

#[tokio::test]
async fn a_silent_or_plaintext_peer_blocks_nobody() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = start().await;
    let addr = mesh.endpoint.trim_start_matches("https://").to_owned();
    // Connects and never says hello.
    let _silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // Speaks plaintext HTTP/2: the handshake fails and the connection is closed.
    let mut plain = tokio::net::TcpStream::connect(&addr).await.unwrap();
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(30), plain.read(&mut buf))
        .await
        .expect("a plaintext peer is answered or dropped")
        .unwrap_or(0);
    assert!(
        n == 0 || buf[0] == 0x15,
        "no tls alert or close: {:?}",
        &buf[..n]
    );

    let channel = connect(&mesh.endpoint, &ClientTls::service(&mesh.cfg).unwrap())
        .await
        .unwrap();
    assert_eq!(whoami(channel).await.unwrap(), "service:ferry");
    mesh.stop().await;
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let mesh = start().await;
    let endpoint = mesh.endpoint.clone();
    let tls = ClientTls::operator(&mesh.cfg).unwrap();
    mesh.stop().await;
    assert!(connect(&endpoint, &tls).await.is_err());
}

mod reflection {
    use tonic::transport::Channel;
    use tonic_reflection::pb::{v1, v1alpha};

    pub async fn list_v1(channel: Channel) -> Vec<String> {
        use v1::server_reflection_client::ServerReflectionClient;
        use v1::server_reflection_request::MessageRequest;
        use v1::server_reflection_response::MessageResponse;
        let req = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        match resp.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("unexpected reflection response {other:?}"),
        }
    }

    pub async fn list_v1alpha(channel: Channel) -> Vec<String> {
        use v1alpha::server_reflection_client::ServerReflectionClient;
        use v1alpha::server_reflection_request::MessageRequest;
        use v1alpha::server_reflection_response::MessageResponse;
        let req = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        match resp.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("unexpected reflection response {other:?}"),
        }
    }

    pub async fn file_containing_v1(channel: Channel, symbol: &str) -> Vec<Vec<u8>> {
        use v1::server_reflection_client::ServerReflectionClient;
        use v1::server_reflection_request::MessageRequest;
        use v1::server_reflection_response::MessageResponse;
        let req = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
        };
        let mut stream = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        match resp.message_response {
            Some(MessageResponse::FileDescriptorResponse(fd)) => fd.file_descriptor_proto,
            other => panic!("unexpected reflection response {other:?}"),
        }
    }
}

/// The real grpcurl, when installed: it lists through reflection, checks health with only
/// the CA, and calls a Ferry RPC with a bearer token and with a host certificate.
#[tokio::test]
async fn grpcurl_lists_checks_and_authenticates() {
    let installed = tokio::process::Command::new("grpcurl")
        .arg("-version")
        .output()
        .await
        .is_ok_and(|out| out.status.success());
    assert!(
        installed,
        "grpcurl is required (deploy/test.sh installs it from PyPI)"
    );
    let mesh = start().await;
    let addr = mesh.endpoint.trim_start_matches("https://").to_owned();
    let ca = mesh.cfg.tls.ca_cert.display().to_string();
    let grpcurl = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("grpcurl")
            .args(&args)
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["-cacert".to_owned(), ca.clone()];
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };

    let (ok, list) = grpcurl(args(&[&addr, "list"])).await;
    assert!(
        ok && list.contains(SCHEDULER) && list.contains("grpc.health.v1.Health"),
        "{list}"
    );

    let (ok, check) = grpcurl(args(&[
        "-d",
        &format!("{{\"service\":\"{SCHEDULER}\"}}"),
        &addr,
        "grpc.health.v1.Health/Check",
    ]))
    .await;
    assert!(ok && check.contains("SERVING"), "{check}");

    let token = mesh.cfg.admin_token().unwrap();
    let auth = format!("authorization: Bearer {token}");
    let method = format!("{SCHEDULER}/ListQueue");
    let (ok, out) = grpcurl(args(&["-H", &auth, &addr, &method])).await;
    assert!(ok && out.contains("token:admin (admin)"), "{out}");

    let (ok, out) = grpcurl(args(&["-H", "authorization: Bearer wrong", &addr, &method])).await;
    assert!(!ok && out.contains("Unauthenticated"), "{out}");

    let tls = mesh.host_tls("hv-07");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = tls.identity.clone().unwrap();
    let cert_path = dir.path().join("host.pem");
    let key_path = dir.path().join("host.key");
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let (ok, out) = grpcurl(args(&[
        "-cert",
        &cert_path.display().to_string(),
        "-key",
        &key_path.display().to_string(),
        &addr,
        &method,
    ]))
    .await;
    assert!(ok && out.contains("host:hv-07"), "{out}");
    mesh.stop().await;
}

/// An endpoint listing several replicas: a dead address is skipped, and a channel whose
/// replica goes away reconnects to the next one that answers.
#[tokio::test]
async fn endpoint_lists_reach_a_surviving_replica() {
    let a = start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_addr = listener.local_addr().unwrap();
    let auth = Authenticator::with_admin_token(&a.cfg.admin_token().unwrap());
    let routes = Routes::new(SchedulerServer::with_interceptor(Probe, auth.interceptor()));
    let tls = ServerTls::load(&a.cfg).unwrap();
    let b_stop = CancellationToken::new();
    let b = tokio::spawn({
        let stop = b_stop.clone();
        async move { serve(listener, &tls, routes, &[SCHEDULER], stop).await }
    });
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let a_addr = a.endpoint.trim_start_matches("https://").to_owned();
    let list = format!("https://{dead},{a_addr},https://{b_addr}");
    let tls = ClientTls::service(&a.cfg).unwrap();
    let channel = connect(&list, &tls).await.unwrap();
    assert_eq!(whoami(channel.clone()).await.unwrap(), "service:ferry");
    let lazy = connect_lazy(&list, &tls).unwrap();
    assert_eq!(whoami(lazy.clone()).await.unwrap(), "service:ferry");

    // Replica a goes away: both channels carry on through b.
    a.stop().await;
    for ch in [channel, lazy] {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match whoami(ch.clone()).await {
                Ok(who) => {
                    assert_eq!(who, "service:ferry");
                    break;
                }
                Err(s) if tokio::time::Instant::now() < deadline => {
                    assert_eq!(s.code(), Code::Unavailable, "{s}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(s) => panic!("no replica reached after a stopped: {s}"),
            }
        }
    }

    // Nothing answers: the error names every address tried.
    b_stop.cancel();
    b.await.unwrap().unwrap();
    let err = connect(&format!("https://{dead},{b_addr}"), &tls)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&dead.to_string()) && err.contains(&b_addr.to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn the_audit_layer_records_changes_and_refusals_and_passes_large_requests() {
    let sink = Arc::new(Collected::default());
    let mesh = start_with(Some(sink.clone())).await;
    let operator = ClientTls::operator(&mesh.cfg).unwrap();
    let channel = connect(&mesh.endpoint, &operator).await.unwrap();
    let token = mesh.cfg.admin_token().unwrap();
    let mut admin = SchedulerClient::new(with_token(channel.clone(), &token).unwrap());
    let dispatch = DispatchRequest {
        vm: "web01".into(),
        ..Default::default()
    };
    admin.dispatch(dispatch.clone()).await.unwrap();
    let mut reader = SchedulerClient::new(with_token(channel.clone(), "reader-token").unwrap());
    let err = reader.dispatch(dispatch).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A read and a routine call let through are not recorded; a change is.
    admin.list_queue(ListQueueRequest::default()).await.unwrap();
    let service = connect(&mesh.endpoint, &ClientTls::service(&mesh.cfg).unwrap())
        .await
        .unwrap();
    SchedulerClient::new(service)
        .cancel_work(ferry_proto::scheduler::v1::CancelWorkRequest {
            host_name: "hv1".into(),
            work_id: "delta-web01".into(),
        })
        .await
        .unwrap();

    // A host's routine call of 6 MiB (more than tonic's 4 MiB default) passes the layer whole;
    // one over the 64 MiB every service allows is refused, naming the limit.
    let host = connect(&mesh.endpoint, &mesh.host_tls("hv1"))
        .await
        .unwrap();
    let mut host = SchedulerClient::new(host);
    let work = |error_len: usize| CompleteWorkRequest {
        work_id: "w1".into(),
        host_name: "hv1".into(),
        error: "x".repeat(error_len),
        ..Default::default()
    };
    host.complete_work(work(6 << 20)).await.unwrap();
    let seen = ERROR_LEN_SEEN.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(seen, 6 << 20, "the handler got the message whole");
    let err = host.complete_work(work(65 << 20)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("larger than"), "{err:?}");
    // No credentials, and a large body: refused without reading it all.
    let mut anonymous = SchedulerClient::new(channel);
    let err = anonymous.complete_work(work(8 << 20)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let records = sink.0.lock().unwrap().clone();
    let brief: Vec<(String, String, String, AuditResult)> = records
        .iter()
        .map(|r| {
            let op = r
                .operation
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            let caller = r.caller.split(':').next().unwrap_or_default().to_owned();
            let caller = if caller == "token" {
                r.caller.clone()
            } else {
                caller
            };
            (caller, op, r.target.clone(), r.result)
        })
        .collect();
    let want = |caller: &str, op: &str, target: &str, result| {
        (caller.to_owned(), op.to_owned(), target.to_owned(), result)
    };
    assert_eq!(
        brief,
        vec![
            want("token:reader", "Dispatch", "vm:web01", AuditResult::Refused),
            want("service", "CancelWork", "", AuditResult::Ok),
            want("anonymous", "CompleteWork", "", AuditResult::Refused),
        ],
        "{records:?}"
    );
    assert_eq!(records[0].component, "scheduler");
    assert_eq!(records[0].role, "reader");
    assert_eq!(records[2].code, "UNAUTHENTICATED");
    assert_eq!(records[2].for_host, "hv1");
    mesh.stop().await;
}
