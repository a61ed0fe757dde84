//! Creating a missing Azure container or S3 bucket: one signed `PUT` each. `object_store`
//! has no call for it, so the request is signed here (Azure Shared Key, AWS SigV4) with the
//! credentials the backend's builder read from the environment. Keys never leave this file:
//! errors name the account, the bucket and the HTTP status only.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use ring::{digest, hmac};

use crate::StoreError;

/// Microsoft's published key of the storage emulator's `devstoreaccount1` (documented by
/// Microsoft and built into every Azure SDK and `object_store`; not a secret).
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
const EMULATOR_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const AZURE_VERSION: &str = "2021-08-06";

fn refused(what: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::invalid(what, reason.to_string())
}

/// A failure worth trying again (no answer, throttled, a server error): transient, so
/// [`crate::Store::prepare`] probes again.
fn unavailable(what: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::ObjectStore(object_store::Error::Generic {
        store: "create container",
        source: format!("{what}: {reason}").into(),
    })
}

/// What an answer to a create-container request means (`ok`: created or already there).
fn outcome(what: &str, status: reqwest::StatusCode, ok: &[u16]) -> Result<(), StoreError> {
    match status.as_u16() {
        s if ok.contains(&s) => Ok(()),
        s if s == 429 || status.is_server_error() => {
            Err(unavailable(what, format!("creating it: http {s}")))
        }
        s => Err(refused(what, format!("creating it was refused: http {s}"))),
    }
}

/// `PUT <container>?restype=container` with Shared Key authorisation. An existing container
/// (409) is success: another component created it first.
pub(super) async fn create_azure_container(
    b: &MicrosoftAzureBuilder,
    container: &str,
) -> Result<(), StoreError> {
    let what = format!("azure container {container:?}");
    let cfg = |k: AzureConfigKey| b.get_config_value(&k).filter(|v| !v.is_empty());
    let emulator = cfg(AzureConfigKey::UseEmulator).is_some_and(|v| v == "true" || v == "1");
    let account = cfg(AzureConfigKey::AccountName)
        .or_else(|| emulator.then(|| EMULATOR_ACCOUNT.to_string()))
        .ok_or_else(|| {
            refused(
                &what,
                "no account to create it with (AZURE_STORAGE_ACCOUNT_NAME)",
            )
        })?;
    let key = cfg(AzureConfigKey::AccessKey)
        .or_else(|| emulator.then(|| EMULATOR_KEY.to_string()))
        .ok_or_else(|| {
            refused(
                &what,
                "it does not exist, and creating it needs the account key (AZURE_STORAGE_ACCOUNT_KEY); create it, or give the key",
            )
        })?;
    let base = match cfg(AzureConfigKey::Endpoint) {
        Some(e) => e,
        None if emulator => {
            let host = std::env::var("AZURITE_BLOB_STORAGE_URL")
                .unwrap_or_else(|_| "http://127.0.0.1:10000".into());
            format!("{}/{account}", host.trim_end_matches('/'))
        }
        None => format!("https://{account}.blob.core.windows.net"),
    };
    let url = url::Url::parse(&format!("{}/{container}", base.trim_end_matches('/')))
        .map_err(|e| refused(&what, format!("endpoint {base:?}: {e}")))?;
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{AZURE_VERSION}\n/{account}{}\nrestype:container",
        url.path()
    );
    let secret = B64
        .decode(key.as_bytes())
        .map_err(|_| refused(&what, "the account key is not base64"))?;
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &secret),
        to_sign.as_bytes(),
    );
    let status = reqwest::Client::new()
        .put(format!("{url}?restype=container"))
        .header("x-ms-date", &date)
        .header("x-ms-version", AZURE_VERSION)
        .header("content-length", "0")
        .header(
            "authorization",
            format!("SharedKey {account}:{}", B64.encode(tag.as_ref())),
        )
        .send()
        .await
        .map_err(|e| unavailable(&what, format!("creating it: {}", e.without_url())))?
        .status();
    outcome(&what, status, &[201, 409])
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

fn hmac256(key: &[u8], data: &str) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
}

/// `PUT /<bucket>` (CreateBucket) signed with SigV4. A bucket that exists and is ours (409
/// BucketAlreadyOwnedByYou) is success.
pub(super) async fn create_s3_bucket(b: &AmazonS3Builder, bucket: &str) -> Result<(), StoreError> {
    let what = format!("s3 bucket {bucket:?}");
    let cfg = |k: AmazonS3ConfigKey| b.get_config_value(&k).filter(|v| !v.is_empty());
    let (Some(key_id), Some(secret)) = (
        cfg(AmazonS3ConfigKey::AccessKeyId),
        cfg(AmazonS3ConfigKey::SecretAccessKey),
    ) else {
        return Err(refused(
            &what,
            "it does not exist, and creating it needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; create it, or give them",
        ));
    };
    let region = cfg(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
    let base = cfg(AmazonS3ConfigKey::Endpoint)
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let url = url::Url::parse(&format!("{}/{bucket}", base.trim_end_matches('/')))
        .map_err(|e| refused(&what, format!("endpoint {base:?}: {e}")))?;
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        (None, _) => return Err(refused(&what, format!("endpoint {base:?} names no host"))),
    };
    let body = if region == "us-east-1" {
        String::new()
    } else {
        format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
        )
    };
    let payload_hash = sha256_hex(body.as_bytes());
    let now = chrono::Utc::now();
    let amz_date = now.format("%Y%m%dT%H%M%SZ").to_string();
    let day = now.format("%Y%m%d").to_string();
    let token = cfg(AmazonS3ConfigKey::Token);
    let mut headers = vec![
        ("host", host.clone()),
        ("x-amz-content-sha256", payload_hash.clone()),
        ("x-amz-date", amz_date.clone()),
    ];
    if let Some(t) = &token {
        headers.push(("x-amz-security-token", t.clone()));
    }
    let signed: Vec<&str> = headers.iter().map(|(k, _)| *k).collect();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical = format!(
        "PUT\n{}\n\n{canonical_headers}\n{}\n{payload_hash}",
        url.path(),
        signed.join(";")
    );
    let scope = format!("{day}/{region}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    );
    let k = hmac256(format!("AWS4{secret}").as_bytes(), &day);
    let k = hmac256(k.as_ref(), &region);
    let k = hmac256(k.as_ref(), "s3");
    let k = hmac256(k.as_ref(), "aws4_request");
    let signature = hex::encode(hmac256(k.as_ref(), &to_sign));
    let mut req = reqwest::Client::new().put(url.as_str()).header(
        "authorization",
        format!(
            "AWS4-HMAC-SHA256 Credential={key_id}/{scope}, SignedHeaders={}, Signature={signature}",
            signed.join(";")
        ),
    );
    for (k, v) in headers.iter().filter(|(k, _)| *k != "host") {
        req = req.header(*k, v);
    }
    let status = req
        .body(body)
        .send()
        .await
        .map_err(|e| unavailable(&what, format!("creating it: {}", e.without_url())))?
        .status();
    outcome(&what, status, &[200, 409])
}
