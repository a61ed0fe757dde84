//! Layered configuration: defaults → TOML file → `FERRY_*` environment → explicit overrides
//! (command-line flags), validated once. Relative paths are relative to `data_dir`.
//!
//! Environment variables: `FERRY_<FIELD>` for top-level fields (`FERRY_REDIS_URL`,
//! `FERRY_STORE_URL`, `FERRY_DATA_DIR`), `FERRY_<SECTION>__<FIELD>` for nested ones
//! (`FERRY_REGISTRY__LISTEN=127.0.0.1:7401`, `FERRY_VAULT__BLOCK_SIZE=65536`,
//! `FERRY_RETENTION__INTERVAL=2s`), and the shorthand `FERRY_RETRY_TIME_UNIT=100ms`. Other
//! `FERRY_*` variables (`FERRY_LOG`) are ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Uncased;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, ServiceError};

/// Default vault block size: 1 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
const MIN_BLOCK_SIZE: u32 = 4 << 10;
const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Top-level keys the environment may set; anything else under `FERRY_` is not config.
const ENV_KEYS: &[&str] = &[
    "data_dir",
    "store_url",
    "redis_url",
    "redis_password_file",
    "redis_ca_cert",
    "tls",
    "vault",
    "registry",
    "scheduler",
    "ingest",
    "storage_writer",
    "failover",
    "gateway",
    "retry",
    "retention",
    "catalog",
    "endpoints",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("cannot load config: {0}")]
    Load(String),
    #[error("invalid config: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("cannot read {path}: {reason}")]
    Secret { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ServiceError for ConfigError {
    fn code(&self) -> ErrorCode {
        match self {
            ConfigError::MissingFile(_) | ConfigError::Load(_) | ConfigError::Invalid { .. } => {
                ErrorCode::InvalidArgument
            }
            ConfigError::Secret { .. } | ConfigError::Write { .. } => ErrorCode::Internal,
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The configuration every Ferry component reads.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MeshConfig {
    /// Root of the vault's local files; relative paths below are relative to it.
    pub data_dir: PathBuf,
    /// Object store URL (`file:///…`, `az://…`, `s3://…`). Empty means `file://<data_dir>/store`.
    #[serde(deserialize_with = "lenient_string")]
    pub store_url: String,
    #[serde(deserialize_with = "lenient_string")]
    pub redis_url: String,
    /// A file (mode 0600) holding the Redis AUTH password, so it stays out of this file and the
    /// URL. `ferry up` writes one for the Redis it starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_password_file: Option<PathBuf>,
    /// For `rediss://`: the PEM of the CA that signed the Redis server's certificate. Default:
    /// the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_ca_cert: Option<PathBuf>,
    pub tls: TlsPaths,
    pub vault: VaultConfig,
    pub registry: Listen,
    pub scheduler: Listen,
    pub ingest: Listen,
    pub storage_writer: Listen,
    pub failover: Listen,
    /// The QUIC gateway's UDP address.
    pub gateway: Listen,
    pub retry: RetryConfig,
    pub retention: RetentionConfig,
    pub catalog: CatalogConfig,
    /// What clients use to reach a component when it is not its `listen` address, by component
    /// name: a load balancer, or several replicas as comma-separated addresses tried in turn
    /// (`scheduler = "https://10.0.0.1:7402,10.0.0.2:7402"`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoints: BTreeMap<String, String>,
    /// The only folders under which an operator's request may have this machine's components
    /// write files (a test failover's `--target`, `MaterializeDisk`'s file), symbolic links
    /// resolved; relative to `data_dir`. Default `exports`.
    pub export_roots: Vec<PathBuf>,
}

/// Where the vault's PKI files are.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct TlsPaths {
    pub ca_cert: PathBuf,
    /// Only the component that signs host certificates (the registry) needs the CA key.
    pub ca_key: Option<PathBuf>,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The `service:ferry` client certificate components use to call each other.
    pub service_cert: PathBuf,
    pub service_key: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct VaultConfig {
    #[serde(deserialize_with = "lenient_string")]
    pub id: String,
    /// 32 raw bytes (or 64 hex characters), mode 0600.
    pub data_key_file: PathBuf,
    pub admin_token_file: PathBuf,
    /// Fixed block size in bytes: a power of two from 4 KiB to 64 MiB.
    pub block_size: u32,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Listen {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RetryConfig {
    /// The unit of the retry schedule (1, 2, 4, 8, 10 units, then every 30): one minute in
    /// production, milliseconds in tests.
    #[serde(with = "humantime_serde")]
    pub time_unit: Duration,
}

/// When the scheduler runs retention (thinning, pruning, garbage collection).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RetentionConfig {
    /// How often each protected VM's retention runs: 10 min by default, seconds in tests.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

/// How the registry bounds its start-up: a snapshot of its state every `snapshot_every`
/// catalog entries, so a start replays only what came after the newest one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct CatalogConfig {
    pub snapshot_every: u64,
}

impl CatalogConfig {
    pub const SNAPSHOT_EVERY: std::ops::RangeInclusive<u64> = 10..=10_000_000;
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            snapshot_every: 1000,
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(600),
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("ferry-data"),
            store_url: String::new(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_password_file: None,
            redis_ca_cert: None,
            tls: TlsPaths::default(),
            vault: VaultConfig::default(),
            registry: Listen::local(7401),
            scheduler: Listen::local(7402),
            ingest: Listen::local(7403),
            storage_writer: Listen::local(7404),
            failover: Listen::local(7405),
            gateway: Listen::local(7406),
            retry: RetryConfig::default(),
            retention: RetentionConfig::default(),
            catalog: CatalogConfig::default(),
            endpoints: BTreeMap::new(),
            export_roots: vec!["exports".into()],
        }
    }
}

impl Default for TlsPaths {
    fn default() -> Self {
        Self {
            ca_cert: "pki/ca.pem".into(),
            ca_key: Some("pki/ca.key".into()),
            server_cert: "pki/server.pem".into(),
            server_key: "pki/server.key".into(),
            service_cert: "pki/service.pem".into(),
            service_key: "pki/service.key".into(),
        }
    }
}

impl Default for VaultConfig {
    fn default() -> Self {
        Self {
            id: "default".into(),
            data_key_file: "vault/data.key".into(),
            admin_token_file: "admin.token".into(),
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            time_unit: Duration::from_secs(60),
        }
    }
}

impl Listen {
    /// `127.0.0.1:<port>`.
    pub fn local(port: u16) -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        }
    }
}

/// A Ferry component with a listening address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Registry,
    Scheduler,
    Ingest,
    StorageWriter,
    Failover,
    Gateway,
}

impl Component {
    pub const ALL: [Component; 6] = [
        Component::Registry,
        Component::Scheduler,
        Component::Ingest,
        Component::StorageWriter,
        Component::Failover,
        Component::Gateway,
    ];

    /// The component's binary: `ferry-<component>`.
    pub fn binary(self) -> &'static str {
        match self {
            Component::Registry => "ferry-registry",
            Component::Scheduler => "ferry-scheduler",
            Component::Ingest => "ferry-ingest",
            Component::StorageWriter => "ferry-storage-writer",
            Component::Failover => "ferry-failover",
            Component::Gateway => "ferry-gateway",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Component::Registry => "registry",
            Component::Scheduler => "scheduler",
            Component::Ingest => "ingest",
            Component::StorageWriter => "storage-writer",
            Component::Failover => "failover",
            Component::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Component {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let normalized = s.trim().to_ascii_lowercase().replace('_', "-");
        Component::ALL
            .into_iter()
            .find(|c| c.as_str() == normalized)
            .ok_or_else(|| {
                invalid(
                    "component",
                    format!(
                        "unknown component {s:?} (expected registry, scheduler, ingest, \
                         storage-writer, failover or gateway)"
                    ),
                )
            })
    }
}

impl MeshConfig {
    /// Loads defaults, then the TOML file (which must exist if given), then `FERRY_*`
    /// environment variables, then `overrides` (for example
    /// `figment::providers::Serialized::default("registry.listen", addr)` or a `Figment`);
    /// resolves relative paths against `data_dir` and validates the result.
    pub fn load(
        path: Option<&Path>,
        overrides: impl figment::Provider,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(MeshConfig::default()));
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: MeshConfig = figment
            .merge(env_provider())
            .merge(overrides)
            .extract()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        config.finish()
    }

    /// Resolves relative paths and validates; `load` calls it, call it after building a
    /// config by hand.
    pub fn finish(mut self) -> Result<Self, ConfigError> {
        self.resolve_paths()?;
        self.validate()?;
        Ok(self)
    }

    /// Writes the config as TOML (mode 0644, atomically), e.g. for `ferry up` to hand to
    /// each component.
    pub fn write_toml(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self)
            .map_err(|e| invalid("config", format!("cannot serialize: {e}")))?;
        // write_file is atomic (a temporary file renamed over it): no reader sees half a config.
        crate::pki::write_file(path, text.as_bytes(), 0o644).map_err(|source| ConfigError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// The listening address of a component.
    pub fn listen(&self, c: Component) -> SocketAddr {
        match c {
            Component::Registry => self.registry.listen,
            Component::Scheduler => self.scheduler.listen,
            Component::Ingest => self.ingest.listen,
            Component::StorageWriter => self.storage_writer.listen,
            Component::Failover => self.failover.listen,
            Component::Gateway => self.gateway.listen,
        }
    }

    /// Sets the listening address of a component (e.g. to the real port after binding `:0`).
    pub fn set_listen(&mut self, c: Component, addr: SocketAddr) {
        let slot = match c {
            Component::Registry => &mut self.registry,
            Component::Scheduler => &mut self.scheduler,
            Component::Ingest => &mut self.ingest,
            Component::StorageWriter => &mut self.storage_writer,
            Component::Failover => &mut self.failover,
            Component::Gateway => &mut self.gateway,
        };
        slot.listen = addr;
    }

    /// The URL clients use to reach a component: its entry in `endpoints` if it has one
    /// (possibly several comma-separated addresses), else `https://<ip>:<port>` of its listen
    /// address, with a wildcard replaced by the loopback address of the same family.
    pub fn endpoint(&self, c: Component) -> String {
        if let Some(e) = self.endpoints.get(c.as_str()) {
            return e.clone();
        }
        let addr = self.listen(c);
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("https://{}", SocketAddr::new(ip, addr.port()))
    }

    /// `p` resolved against `data_dir` when relative. Paths are already resolved after
    /// [`MeshConfig::load`] / [`MeshConfig::finish`]; this keeps a hand-built config working.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_relative() {
            self.data_dir.join(p)
        } else {
            p.to_owned()
        }
    }

    /// A copy with every relative path resolved against `data_dir` (not validated).
    pub(crate) fn with_resolved_paths(&self) -> MeshConfig {
        let mut cfg = self.clone();
        cfg.resolve_relative_paths();
        cfg
    }

    /// The vault data key (32 bytes). Errors never include the key.
    pub fn data_key(&self) -> Result<[u8; 32], ConfigError> {
        let path = &self.path(&self.vault.data_key_file);
        let bytes = std::fs::read(path).map_err(|e| secret_error(path, e.to_string()))?;
        if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok(key);
        }
        let text = std::str::from_utf8(&bytes)
            .map(str::trim)
            .unwrap_or_default();
        let mut key = [0u8; 32];
        hex::decode_to_slice(text, &mut key)
            .map_err(|_| secret_error(path, "expected 32 raw bytes or 64 hex characters".into()))?;
        Ok(key)
    }

    /// The admin bearer token. Errors never include the token.
    pub fn admin_token(&self) -> Result<String, ConfigError> {
        let path = &self.path(&self.vault.admin_token_file);
        let text = std::fs::read_to_string(path).map_err(|e| secret_error(path, e.to_string()))?;
        let token = text.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(secret_error(
                path,
                "expected one token of visible ascii characters".into(),
            ));
        }
        Ok(token.to_owned())
    }

    /// The Redis AUTH password from `redis_password_file`, if one is configured. Errors never
    /// include the password.
    pub fn redis_password(&self) -> Result<Option<String>, ConfigError> {
        let Some(file) = &self.redis_password_file else {
            return Ok(None);
        };
        let path = &self.path(file);
        let text = std::fs::read_to_string(path).map_err(|e| secret_error(path, e.to_string()))?;
        let password = text.trim_end_matches(['\r', '\n']);
        if password.is_empty() || password.contains(['\r', '\n']) {
            return Err(secret_error(path, "expected one line, the password".into()));
        }
        Ok(Some(password.to_owned()))
    }

    /// The PEM of `redis_ca_cert`, if one is configured.
    pub fn redis_ca_pem(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(file) = &self.redis_ca_cert else {
            return Ok(None);
        };
        let path = &self.path(file);
        std::fs::read(path)
            .map(Some)
            .map_err(|e| secret_error(path, e.to_string()))
    }

    /// The object store URL, defaulting to `file://<data_dir>/store`.
    pub fn store_url(&self) -> String {
        if self.store_url.is_empty() {
            format!("file://{}", self.data_dir.join("store").display())
        } else {
            self.store_url.clone()
        }
    }

    fn resolve_paths(&mut self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        self.data_dir =
            std::path::absolute(&self.data_dir).map_err(|e| invalid("data_dir", e.to_string()))?;
        self.resolve_relative_paths();
        self.store_url = self.store_url();
        Ok(())
    }

    fn resolve_relative_paths(&mut self) {
        let dir = self.data_dir.clone();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        let tls = &mut self.tls;
        for p in [
            &mut tls.ca_cert,
            &mut tls.server_cert,
            &mut tls.server_key,
            &mut tls.service_cert,
            &mut tls.service_key,
        ] {
            resolve(p);
        }
        if let Some(p) = tls.ca_key.as_mut() {
            resolve(p);
        }
        resolve(&mut self.vault.data_key_file);
        resolve(&mut self.vault.admin_token_file);
        for p in [&mut self.redis_password_file, &mut self.redis_ca_cert]
            .into_iter()
            .flatten()
        {
            resolve(p);
        }
        for r in &mut self.export_roots {
            resolve(r);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let id = &self.vault.id;
        let id_ok = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !id_ok {
            return Err(invalid(
                "vault.id",
                format!("{id:?} must be 1-64 letters, digits, '.', '_' or '-'"),
            ));
        }
        let bs = self.vault.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(invalid(
                "vault.block_size",
                format!("{bs} must be a power of two from 4096 to 67108864"),
            ));
        }
        if self.retry.time_unit.is_zero() {
            return Err(invalid("retry.time_unit", "must be greater than zero"));
        }
        if self.retention.interval < Duration::from_secs(1) {
            return Err(invalid("retention.interval", "must be at least 1s"));
        }
        let every = self.catalog.snapshot_every;
        if !CatalogConfig::SNAPSHOT_EVERY.contains(&every) {
            let r = CatalogConfig::SNAPSHOT_EVERY;
            return Err(invalid(
                "catalog.snapshot_every",
                format!("{every} must be from {} to {} entries", r.start(), r.end()),
            ));
        }
        check_url(
            "store_url",
            &self.store_url,
            &["file", "az", "azure", "s3", "gs", "memory", "http", "https"],
        )?;
        check_url(
            "redis_url",
            &self.redis_url,
            &["redis", "rediss", "redis+unix", "unix"],
        )?;
        for (name, endpoint) in &self.endpoints {
            let c: Component = name.parse()?;
            if c == Component::Gateway {
                return Err(invalid(
                    "endpoints",
                    "the gateway's address is gateway.listen",
                ));
            }
            if endpoint.split(',').any(|a| a.trim().is_empty()) {
                return Err(invalid(
                    "endpoints",
                    format!("{name} = {endpoint:?} has an empty address"),
                ));
            }
        }
        self.check_ports()
    }

    /// Two TCP components on the same address would fail at bind time with a less clear error.
    /// The gateway is UDP, so it may share a port number with a TCP component.
    fn check_ports(&self) -> Result<(), ConfigError> {
        let tcp: Vec<Component> = Component::ALL
            .into_iter()
            .filter(|c| *c != Component::Gateway)
            .collect();
        for (i, a) in tcp.iter().enumerate() {
            for b in &tcp[i + 1..] {
                let (x, y) = (self.listen(*a), self.listen(*b));
                if x.port() != 0 && x == y {
                    return Err(invalid("listen", format!("{a} and {b} both listen on {x}")));
                }
            }
        }
        Ok(())
    }
}

fn check_url(field: &'static str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme {
        Some(s) if schemes.contains(&s.as_str()) => Ok(()),
        _ => Err(invalid(
            field,
            format!(
                "expected a URL with one of the schemes {}",
                schemes.join(", ")
            ),
        )),
    }
}

/// Accepts numbers and booleans where a string is expected: the environment provider parses
/// `FERRY_VAULT__ID=7` as a number.
fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Unsigned(u64),
        Signed(i64),
        Float(f64),
        Bool(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::Text(s) => s,
        Scalar::Unsigned(n) => n.to_string(),
        Scalar::Signed(n) => n.to_string(),
        Scalar::Float(n) => n.to_string(),
        Scalar::Bool(b) => b.to_string(),
    })
}

fn secret_error(path: &Path, reason: String) -> ConfigError {
    ConfigError::Secret {
        path: path.to_owned(),
        reason,
    }
}

/// `FERRY_*` variables, with `__` as the nesting separator.
fn env_provider() -> Env {
    Env::prefixed("FERRY_").filter_map(|key| {
        let key = key.as_str().to_ascii_lowercase().replace("__", ".");
        let key = if key == "retry_time_unit" {
            "retry.time_unit".to_owned()
        } else {
            key
        };
        let top = key.split('.').next().unwrap_or_default();
        ENV_KEYS.contains(&top).then(|| Uncased::from_owned(key))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let cfg = MeshConfig::default().finish().unwrap();
        assert!(cfg.data_dir.is_absolute());
        assert!(cfg.tls.ca_cert.ends_with("ferry-data/pki/ca.pem"));
        assert!(cfg.store_url.starts_with("file:///"));
        assert_eq!(cfg.endpoint(Component::Registry), "https://127.0.0.1:7401");
    }

    #[test]
    fn wildcard_endpoints_use_loopback() {
        let mut cfg = MeshConfig::default();
        cfg.set_listen(Component::Ingest, "0.0.0.0:9000".parse().unwrap());
        cfg.set_listen(Component::Failover, "[::]:9001".parse().unwrap());
        assert_eq!(cfg.endpoint(Component::Ingest), "https://127.0.0.1:9000");
        assert_eq!(cfg.endpoint(Component::Failover), "https://[::1]:9001");
    }

    #[test]
    fn endpoint_overrides() {
        let mut cfg = MeshConfig::default();
        cfg.endpoints.insert(
            "scheduler".into(),
            "https://127.0.0.1:7001,127.0.0.1:7101".into(),
        );
        let cfg = cfg.finish().unwrap();
        assert_eq!(
            cfg.endpoint(Component::Scheduler),
            "https://127.0.0.1:7001,127.0.0.1:7101"
        );
        assert_eq!(cfg.endpoint(Component::Registry), "https://127.0.0.1:7401");
        let text = toml::to_string_pretty(&cfg).unwrap();
        let back: MeshConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.endpoints, cfg.endpoints);
        let mut bad = MeshConfig::default();
        bad.endpoints
            .insert("nope".into(), "https://127.0.0.1:1".into());
        assert!(bad.finish().is_err());
        let mut bad = MeshConfig::default();
        bad.endpoints
            .insert("ingest".into(), "https://127.0.0.1:1,".into());
        assert!(bad.finish().is_err());
    }

    #[test]
    fn components_round_trip() {
        for c in Component::ALL {
            assert_eq!(c.to_string().parse::<Component>().unwrap(), c);
        }
        assert_eq!(
            "storage_writer".parse::<Component>().unwrap(),
            Component::StorageWriter
        );
        assert!("nope".parse::<Component>().is_err());
    }

    #[test]
    fn bad_values_are_rejected() {
        let mut cfg = MeshConfig::default();
        cfg.vault.block_size = 1000;
        assert!(cfg.clone().finish().is_err());
        cfg.vault.block_size = DEFAULT_BLOCK_SIZE;
        cfg.scheduler = cfg.registry;
        assert!(cfg.clone().finish().is_err());
        cfg.scheduler = Listen::local(7402);
        cfg.redis_url = "localhost:6379".into();
        assert!(cfg.finish().is_err());
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
    fn retention_interval_from_toml_and_env() {
        assert_eq!(
            MeshConfig::default().retention.interval,
            Duration::from_secs(600)
        );
        figment::Jail::expect_with(|jail| {
            jail.create_file("ferry.toml", "[retention]\ninterval = \"90s\"\n")?;
            let load = || {
                MeshConfig::load(Some(Path::new("ferry.toml")), Figment::new())
                    .map_err(|e| e.to_string())
            };
            assert_eq!(load()?.retention.interval, Duration::from_secs(90));
            jail.set_env("FERRY_RETENTION__INTERVAL", "2s");
            assert_eq!(load()?.retention.interval, Duration::from_secs(2));
            jail.set_env("FERRY_RETENTION__INTERVAL", "10ms");
            let err = load().unwrap_err();
            assert!(err.contains("retention.interval"), "{err}");
            Ok(())
        });
    }
}
