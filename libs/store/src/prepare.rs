//! `Store::prepare`: what a mesh checks of its store before it starts on it.
//!
//! 1. The container or bucket exists: when a put says it does not, it is created (Azure with
//!    the account's shared key, S3 with SigV4, both from the same environment the backend
//!    reads), if the credentials allow it. GCS buckets are not created (that needs a project
//!    and a location Ferry has no business choosing): the error says so.
//! 2. The backend honours put-if-absent. Catalog entries, manifests and the audit trail are
//!    written with `PutMode::Create`; a backend that overwrites instead would let two writers
//!    both win. A probe object is written twice: the second write must be refused. If it is
//!    not, or the backend cannot do conditional puts at all, Ferry refuses to start, naming
//!    why.

use bytes::Bytes;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use tracing::{info, warn};

use crate::backend::{self, Backend, CloudUrl};
use crate::layout::probe_key;
use crate::{Store, StoreError};

mod sign;

/// Probe attempts after the first that a transient failure may cost.
const PROBE_RETRIES: u32 = 5;

impl Store {
    /// Creates the container or bucket when it is missing and checks that the backend
    /// refuses to overwrite an object written with put-if-absent. See the module docs.
    /// Transient failures (throttling, a lost response) run the probe again with a new key.
    pub async fn prepare(&self) -> Result<(), StoreError> {
        let mut backoff = ferry_model::Backoff::new(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(2),
        );
        loop {
            match self.probe().await {
                Err(e) if e.is_transient() && backoff.failures() < PROBE_RETRIES => {
                    warn!(store = %self.url(), error = %e, "probing the store failed, trying again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                r => return r,
            }
        }
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let key = probe_key(&uuid::Uuid::new_v4());
        let path = object_store::path::Path::from(key.as_str());
        match self.put_create(&path, "first").await {
            Err(object_store::Error::NotFound { .. }) => {
                self.create_bucket().await?;
                self.put_create(&path, "first")
                    .await
                    .map_err(|e| self.refusal(e))?;
            }
            r => r.map_err(|e| self.refusal(e))?,
        }
        let second = self.put_create(&path, "second").await;
        let got = self.get(&key).await;
        let _ = self.delete(&key).await;
        match second {
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Ok(()) => {
                return Err(StoreError::invalid(
                    "store",
                    format!(
                        "{} overwrote an object written with put-if-absent (a second conditional put of {key} succeeded); Ferry's catalog and manifests need a backend that refuses it",
                        self.url()
                    ),
                ));
            }
            Err(e) => return Err(self.refusal(e)),
        }
        match got? {
            Some(b) if b.as_ref() == b"first" => Ok(()),
            other => Err(StoreError::invalid(
                "store",
                format!(
                    "{} refused the second put-if-absent of {key} but holds {:?} instead of the first write",
                    self.url(),
                    other.map(|b| String::from_utf8_lossy(&b).into_owned())
                ),
            )),
        }
    }

    async fn put_create(
        &self,
        path: &object_store::path::Path,
        body: &'static str,
    ) -> Result<(), object_store::Error> {
        let opts = PutOptions::from(PutMode::Create);
        let payload = PutPayload::from_bytes(Bytes::from_static(body.as_bytes()));
        self.object_store()
            .put_opts(path, payload, opts)
            .await
            .map(|_| ())
    }

    /// A probe put that failed for another reason than "exists": say what the backend lacks.
    fn refusal(&self, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotImplemented { .. } => StoreError::invalid(
                "store",
                format!(
                    "{} cannot do conditional puts (put-if-absent), which Ferry's catalog and manifests need: {e}",
                    self.url()
                ),
            ),
            other => StoreError::ObjectStore(other),
        }
    }

    async fn create_bucket(&self) -> Result<(), StoreError> {
        let url = self.url().to_string();
        let Some(cloud) = CloudUrl::parse(&url)? else {
            return Err(StoreError::NotFound {
                what: format!("the folder of store {url}"),
            });
        };
        match cloud.backend {
            Backend::Azure => {
                let b = backend::azure(&url, &cloud)?;
                sign::create_azure_container(&b, &cloud.bucket).await?;
            }
            Backend::S3 => {
                let b = backend::s3(&url, &cloud)?;
                sign::create_s3_bucket(&b, &cloud.bucket).await?;
            }
            Backend::Gcs => {
                return Err(StoreError::NotFound {
                    what: format!(
                        "gcs bucket {:?}: Ferry does not create GCS buckets (that needs a project and location); create it first",
                        cloud.bucket
                    ),
                });
            }
        }
        info!(store = %url, bucket = %cloud.bucket, "created the store's container");
        Ok(())
    }
}
