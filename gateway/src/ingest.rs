//! The gateway's gRPC link to replication-ingest: may a host upload into a cycle, and what
//! landed. The channel connects on first use and reconnects after failures, so the gateway
//! can start before ingest does.

use std::time::Duration;

use ferry_proto::ingest::v1::ingest_client::IngestClient;
use ferry_proto::ingest::v1::{AuthorizeUploadRequest, ReportLandedRequest};
use tonic::Code;
use tonic::transport::Channel;

/// How long an AuthorizeUpload call may take.
const AUTHORIZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a ReportLanded call may take (a batch's ACK waits for it).
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot reach ingest: {0}")]
    Connect(#[from] ferry_mesh::MeshError),
    #[error("ingest {call} failed: {status}")]
    Call {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("ingest {0} timed out")]
    Timeout(&'static str),
}

impl IngestError {
    /// Whether asking again later may give an answer.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout(_) => true,
            Self::Call { status, .. } => matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Unknown
            ),
        }
    }
}

/// Status codes by which ingest refuses a request for good (as opposed to failing).
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::NotFound
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::OutOfRange
    )
}

/// Ingest's answer to "may this host upload into this cycle".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Denied(String),
}

/// What one batch put into the store, for ReportLanded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Landed {
    pub cycle_id: String,
    pub host_name: String,
    pub chunks_written: u64,
    pub bytes_written: u64,
    pub chunks_skipped: u64,
    pub bytes_skipped: u64,
    pub plain_bytes_written: u64,
}

/// A lazily connecting ingest client authenticated with the service certificate.
pub struct IngestLink {
    client: IngestClient<Channel>,
}

impl IngestLink {
    pub fn new(endpoint: &str, tls: &ferry_mesh::ClientTls) -> Result<Self, IngestError> {
        let channel = ferry_mesh::connect_lazy(endpoint, tls)?;
        Ok(Self {
            client: IngestClient::new(channel),
        })
    }

    /// Asks ingest whether `host_name` may upload into `cycle_id`. A refusal by status
    /// (unknown cycle, wrong host, closed cycle) is a definitive [`Decision::Denied`]; an
    /// unreachable or failing ingest is an error.
    pub async fn authorize(
        &self,
        cycle_id: &str,
        host_name: &str,
    ) -> Result<Decision, IngestError> {
        let req = AuthorizeUploadRequest {
            cycle_id: cycle_id.to_owned(),
            host_name: host_name.to_owned(),
        };
        let mut client = self.client.clone();
        let call = client.authorize_upload(req);
        let resp = match tokio::time::timeout(AUTHORIZE_TIMEOUT, call).await {
            Err(_) => return Err(IngestError::Timeout("AuthorizeUpload")),
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) if is_refusal(status.code()) => {
                return Ok(Decision::Denied(status.message().to_owned()));
            }
            Ok(Err(status)) => {
                return Err(IngestError::Call {
                    call: "AuthorizeUpload",
                    status,
                });
            }
        };
        if resp.allowed {
            Ok(Decision::Allowed)
        } else if resp.reason.is_empty() {
            Ok(Decision::Denied("not allowed".into()))
        } else {
            Ok(Decision::Denied(resp.reason))
        }
    }

    pub async fn report_landed(&self, landed: &Landed) -> Result<(), IngestError> {
        let req = ReportLandedRequest {
            cycle_id: landed.cycle_id.clone(),
            host_name: landed.host_name.clone(),
            chunks_written: landed.chunks_written,
            bytes_written: landed.bytes_written,
            chunks_skipped: landed.chunks_skipped,
            bytes_skipped: landed.bytes_skipped,
            plain_bytes_written: landed.plain_bytes_written,
        };
        let mut client = self.client.clone();
        let call = client.report_landed(req);
        match tokio::time::timeout(REPORT_TIMEOUT, call).await {
            Err(_) => Err(IngestError::Timeout("ReportLanded")),
            Ok(Err(status)) => Err(IngestError::Call {
                call: "ReportLanded",
                status,
            }),
            Ok(Ok(_)) => Ok(()),
        }
    }
}
