//! Which object store a store URL names, and how it is configured.
//!
//! * `file:///abs/dir[?fsync=false]` — the local filesystem;
//! * `memory://` — a fresh in-memory store (tests);
//! * `az://container/prefix` (also `azure://`) — Azure Blob Storage;
//! * `s3://bucket/prefix` — Amazon S3 and S3-compatible servers;
//! * `gs://bucket/prefix` — Google Cloud Storage.
//!
//! Credentials come only from the environment variables each `object_store` builder reads
//! (`AZURE_*`, including `AZURE_STORAGE_USE_EMULATOR` and `AZURITE_BLOB_STORAGE_URL`;
//! `AWS_*`; `GOOGLE_*`). The URL is written to `ferry.toml`, shown by `ferry status` and
//! logged, so a query option that would carry a secret is refused, naming the variable to
//! use instead. The options a URL may carry are the non-secret ones (endpoint, region,
//! account, plain HTTP for a local emulator).
//!
//! Throttling (429/503), 5xx, timeouts and connection resets are retried with backoff by
//! `object_store`'s own client (10 tries within 3 minutes); what still fails reaches the
//! caller as a transient [`StoreError::ObjectStore`].

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;

use crate::StoreError;

/// The cloud backends a URL may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Azure,
    S3,
    Gcs,
}

/// A parsed cloud store URL: the backend, its container or bucket, the key prefix inside it
/// and the non-secret options of the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudUrl {
    pub backend: Backend,
    pub bucket: String,
    pub prefix: String,
    pub options: Vec<(String, String)>,
}

/// Options a URL may carry, per backend.
fn allowed_options(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::Azure => &["account", "endpoint", "use_emulator", "allow_http"],
        Backend::S3 => &[
            "endpoint",
            "region",
            "allow_http",
            "virtual_hosted_style_request",
            "conditional_put",
        ],
        Backend::Gcs => &[],
    }
}

/// Where each backend's credentials go instead of the URL.
fn credential_vars(backend: Backend) -> &'static str {
    match backend {
        Backend::Azure => "AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY or AZURE_CLIENT_SECRET",
        Backend::S3 => "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN",
        Backend::Gcs => "GOOGLE_SERVICE_ACCOUNT or GOOGLE_APPLICATION_CREDENTIALS",
    }
}

/// Words that mark a query option as a secret.
const SECRET_WORDS: [&str; 7] = [
    "key",
    "secret",
    "token",
    "sas",
    "password",
    "credential",
    "sig",
];

/// An error naming the URL without its query and user part, which may hold what the
/// caller should not have put there.
fn bad(url: &str, reason: impl std::fmt::Display) -> StoreError {
    let shown = url.split('?').next().unwrap_or(url);
    let shown = match shown.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, host)) => format!("{scheme}://{host}"),
            None => shown.to_string(),
        },
        None => shown.to_string(),
    };
    StoreError::invalid("store url", format!("{shown:?}: {reason}"))
}

impl CloudUrl {
    /// Parses `scheme://bucket/prefix?options`; `None` when the scheme is not a cloud one.
    pub fn parse(raw: &str) -> Result<Option<Self>, StoreError> {
        let Some((scheme, _)) = raw.split_once("://") else {
            return Ok(None);
        };
        let backend = match scheme {
            "az" | "azure" => Backend::Azure,
            "s3" => Backend::S3,
            "gs" => Backend::Gcs,
            _ => return Ok(None),
        };
        let url = url::Url::parse(raw).map_err(|e| bad(raw, e))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                raw,
                format!(
                    "credentials never go in the store url (it is written to ferry.toml and logs); set {}",
                    credential_vars(backend)
                ),
            ));
        }
        let bucket = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                bad(
                    raw,
                    format!("names no container or bucket: {scheme}://NAME/prefix"),
                )
            })?
            .to_string();
        // The path as written: `url` resolves `..` and `.`, which would change the value the
        // operator gave instead of refusing it.
        let written = raw[scheme.len() + 3..]
            .split(['?', '#'])
            .next()
            .unwrap_or("");
        let written_path = written.split_once('/').map_or("", |(_, p)| p);
        let prefix = parse_prefix(raw, written_path)?;
        if prefix != url.path().trim_matches('/') {
            return Err(bad(
                raw,
                format!("the prefix {prefix:?} is not a plain path"),
            ));
        }
        let options = parse_options(raw, backend, &url)?;
        Ok(Some(CloudUrl {
            backend,
            bucket,
            prefix,
            options,
        }))
    }

    fn option(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The key prefix: path segments without `.`, `..` or empty ones.
fn parse_prefix(raw: &str, path: &str) -> Result<String, StoreError> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    for seg in trimmed.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(bad(
                raw,
                format!("the prefix {trimmed:?} has an empty, '.' or '..' segment"),
            ));
        }
    }
    Ok(trimmed.to_string())
}

fn parse_options(
    raw: &str,
    backend: Backend,
    url: &url::Url,
) -> Result<Vec<(String, String)>, StoreError> {
    let allowed = allowed_options(backend);
    let mut out = Vec::new();
    for (k, v) in url.query_pairs() {
        let lower = k.to_ascii_lowercase();
        if SECRET_WORDS.iter().any(|w| lower.contains(w)) {
            return Err(bad(
                raw,
                format!(
                    "option {k:?} would put a secret in the store url (it is written to ferry.toml and logs); set {} instead",
                    credential_vars(backend)
                ),
            ));
        }
        if !allowed.contains(&lower.as_str()) {
            return Err(bad(
                raw,
                format!("unknown option {k:?} (allowed: {})", allowed.join(", ")),
            ));
        }
        out.push((lower, v.into_owned()));
    }
    Ok(out)
}

fn flag(raw: &str, name: &str, v: &str) -> Result<bool, StoreError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad(
            raw,
            format!("option {name}={v:?} must be true or false"),
        )),
    }
}

/// Opens the object store a URL names. `Ok(None)` for a scheme this module does not know.
pub(crate) fn open(raw: &str) -> Result<Option<Arc<dyn ObjectStore>>, StoreError> {
    if raw == "memory://" || raw == "memory:///" {
        return Ok(Some(Arc::new(InMemory::new())));
    }
    if let Some(rest) = raw.strip_prefix("file://") {
        return open_local(raw, rest).map(Some);
    }
    let Some(cloud) = CloudUrl::parse(raw)? else {
        return Ok(None);
    };
    // reqwest is built without a bundled TLS provider: use the ring one Ferry's own TLS uses.
    // Installing twice (a second store in the process) is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let store: Arc<dyn ObjectStore> = match cloud.backend {
        Backend::Azure => prefixed(azure(raw, &cloud)?.build()?, &cloud.prefix),
        Backend::S3 => prefixed(s3(raw, &cloud)?.build()?, &cloud.prefix),
        Backend::Gcs => prefixed(gcs(&cloud).build()?, &cloud.prefix),
    };
    Ok(Some(store))
}

fn prefixed<T: ObjectStore>(store: T, prefix: &str) -> Arc<dyn ObjectStore> {
    if prefix.is_empty() {
        Arc::new(store)
    } else {
        Arc::new(PrefixStore::new(store, prefix))
    }
}

/// The Azure builder for a URL: the environment first, then the URL's options.
pub fn azure(raw: &str, cloud: &CloudUrl) -> Result<MicrosoftAzureBuilder, StoreError> {
    let mut b = MicrosoftAzureBuilder::from_env().with_container_name(&cloud.bucket);
    if let Some(a) = cloud.option("account") {
        b = b.with_account(a);
    }
    if let Some(e) = cloud.option("endpoint") {
        b = b.with_endpoint(e.to_string());
    }
    if let Some(v) = cloud.option("use_emulator") {
        b = b.with_use_emulator(flag(raw, "use_emulator", v)?);
    }
    if let Some(v) = cloud.option("allow_http") {
        b = b.with_allow_http(flag(raw, "allow_http", v)?);
    }
    Ok(b)
}

/// The S3 builder for a URL: the environment first, then the URL's options.
pub fn s3(raw: &str, cloud: &CloudUrl) -> Result<AmazonS3Builder, StoreError> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&cloud.bucket);
    if let Some(e) = cloud.option("endpoint") {
        b = b.with_endpoint(e);
    }
    if let Some(r) = cloud.option("region") {
        b = b.with_region(r);
    }
    if let Some(v) = cloud.option("allow_http") {
        b = b.with_allow_http(flag(raw, "allow_http", v)?);
    }
    if let Some(v) = cloud.option("virtual_hosted_style_request") {
        b = b.with_virtual_hosted_style_request(flag(raw, "virtual_hosted_style_request", v)?);
    }
    if let Some(v) = cloud.option("conditional_put") {
        b = b.with_config(AmazonS3ConfigKey::ConditionalPut, v);
    }
    Ok(b)
}

/// The GCS builder for a URL (the environment only: GCS options have no URL form yet).
pub fn gcs(cloud: &CloudUrl) -> GoogleCloudStorageBuilder {
    GoogleCloudStorageBuilder::from_env().with_bucket_name(&cloud.bucket)
}

/// `file:///abs/dir[?fsync=true|false]`, the directory created if missing, with fsync on
/// every write unless turned off (tests, scratch space).
fn open_local(url: &str, rest: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let (dir, query) = match rest.split_once('?') {
        Some((d, q)) => (d, Some(q)),
        None => (rest, None),
    };
    let fsync = match query {
        None | Some("fsync=true") => true,
        Some("fsync=false") => false,
        Some(q) => {
            return Err(bad(
                url,
                format!("unknown option {q:?} (supported: fsync=true|false)"),
            ));
        }
    };
    if !dir.starts_with('/') {
        return Err(bad(url, "needs an absolute path: file:///abs/dir"));
    }
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
        what: format!("creating store directory {dir}"),
        source,
    })?;
    let fs = LocalFileSystem::new_with_prefix(dir)?
        .with_fsync(fsync)
        .with_automatic_cleanup(true);
    Ok(Arc::new(fs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_urls_parse_into_bucket_prefix_and_options() {
        let u = CloudUrl::parse("s3://ferry-b/site-a/vault?endpoint=http://127.0.0.1:9000&region=eu-west-1&allow_http=true")
            .unwrap()
            .unwrap();
        assert_eq!(u.backend, Backend::S3);
        assert_eq!(u.bucket, "ferry-b");
        assert_eq!(u.prefix, "site-a/vault");
        assert_eq!(u.option("endpoint"), Some("http://127.0.0.1:9000"));
        assert_eq!(u.option("region"), Some("eu-west-1"));
        let a = CloudUrl::parse("az://vault").unwrap().unwrap();
        assert_eq!(
            (a.backend, a.bucket.as_str(), a.prefix.as_str()),
            (Backend::Azure, "vault", "")
        );
        let g = CloudUrl::parse("gs://bkt/p/").unwrap().unwrap();
        assert_eq!((g.backend, g.prefix.as_str()), (Backend::Gcs, "p"));
        assert!(CloudUrl::parse("file:///tmp/x").unwrap().is_none());
    }

    #[test]
    fn secrets_in_the_url_are_refused_naming_the_variable_to_use() {
        for url in [
            "s3://b/p?secret_access_key=abc",
            "s3://AKIA:abc@b/p",
            "az://c/p?sas_key=sv%3D1",
            "az://c/p?access_key=abc",
            "gs://b/p?service_account_key=abc",
        ] {
            let e = CloudUrl::parse(url).unwrap_err().to_string();
            assert!(
                e.contains("never go in the store url") || e.contains("would put a secret"),
                "{url}: {e}"
            );
            assert!(!e.contains("abc"), "the refused secret is not echoed: {e}");
        }
        let e = CloudUrl::parse("s3://b/p?secret_access_key=abc")
            .unwrap_err()
            .to_string();
        assert!(e.contains("AWS_SECRET_ACCESS_KEY"), "{e}");
    }

    #[test]
    fn unknown_options_and_bad_prefixes_are_refused_with_what_is_allowed() {
        let e = CloudUrl::parse("s3://b/p?colour=red")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("colour") && e.contains("endpoint, region"),
            "{e}"
        );
        let e = CloudUrl::parse("gs://b/p?endpoint=x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allowed: )"), "{e}");
        let e = CloudUrl::parse("az://c/a/../b").unwrap_err().to_string();
        assert!(e.contains("'..'") || e.contains("segment"), "{e}");
        let e = CloudUrl::parse("s3:///p").unwrap_err().to_string();
        assert!(e.contains("bucket") || e.contains("empty host"), "{e}");
        let e = CloudUrl::parse("s3://b/p?allow_http=maybe").map(|_| ());
        assert!(e.is_ok(), "flags are checked when the store is built");
        let cloud = CloudUrl::parse("s3://b/p?allow_http=maybe")
            .unwrap()
            .unwrap();
        let e = s3("s3://b/p?allow_http=maybe", &cloud)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("true or false"), "{e}");
    }

    #[test]
    fn gcs_takes_its_service_account_from_the_environment_only() {
        let cloud = CloudUrl::parse("gs://ferry-vault/site-a").unwrap().unwrap();
        // Without credentials GCS refuses to build, naming what is missing.
        let built = gcs(&cloud)
            .with_service_account_path("/nonexistent/ferry-gcs.json")
            .build();
        let e = built.expect_err("no such credentials file").to_string();
        assert!(
            e.contains("ferry-gcs.json") || e.to_lowercase().contains("credential"),
            "{e}"
        );
        // A service account key given as JSON is parsed; its bucket is the URL's.
        let b = gcs(&cloud);
        assert_eq!(
            b.get_config_value(&object_store::gcp::GoogleConfigKey::Bucket)
                .as_deref(),
            Some("ferry-vault")
        );
    }
}
