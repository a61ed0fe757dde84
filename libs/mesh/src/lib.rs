//! Server plumbing shared by every Ferry component: layered configuration, tracing, the vault
//! PKI, TLS for gRPC and QUIC (always with the `ring` rustls provider, chosen explicitly), caller
//! authentication, a gRPC server with health and reflection, and error → `tonic::Status`.

pub mod audit;
pub mod auth;
pub mod client;
pub mod component;
pub mod config;
pub mod error;
pub mod peers;
pub mod pki;
pub mod quic;
pub mod retry;
pub mod revocation;
pub mod scope;
pub mod server;
pub mod shutdown;
pub mod telemetry;
mod tls;
pub mod vault;

pub use audit::Audited;
pub use auth::{
    AuthInterceptor, Authenticator, Caller, RevocationCheck, Role, TokenGrant, TokenGrants, caller,
    require_host, require_role, require_service, token_hash,
};
pub use client::{AuthChannel, BearerToken, ClientTls, connect, connect_lazy, with_token};
pub use component::{ComponentArgs, component_main, serve_component};
pub use config::{Component, ConfigError, Listen, MeshConfig, RetryConfig, TlsPaths, VaultConfig};
pub use error::{ErrorCode, MeshError, ServiceError, error_chain, to_status, unimplemented};
pub use peers::Peers;
pub use pki::{
    Identity, PkiError, VaultCa, cert_serial_hex, cert_serial_hex_pem, new_csr, write_secret,
};
pub use quic::{
    ALPN_FERRY, quic_client_config, quic_peer_identity, quic_peer_serial, quic_server_config,
    quic_transport_config,
};
pub use retry::{GaveUp, retry, transient_error, transient_status};
pub use revocation::{RevocationList, component_authenticator};
pub use scope::VmOwners;
pub use server::{ServerTls, serve, serve_with_drain};
pub use shutdown::shutdown_on_signal;
pub use telemetry::init_tracing;
pub use vault::{SERVICE_NAME, bootstrap_vault, load_ca};

/// Re-exported so callers name the same versions this crate was built with.
pub use tokio_util::sync::CancellationToken;
