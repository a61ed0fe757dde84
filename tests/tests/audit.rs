//! The audit trail (issue #16): every change and every refusal, whoever made it, is listed by
//! `ferry audit` with its caller, target and result; `ferry audit --verify` names an entry
//! that was removed from or altered in the store by hand.
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::*;

/// The records `ferry audit` lists for these extra arguments.
fn trail(t: &TestMesh, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut all = vec!["audit", "-o", "json"];
    all.extend_from_slice(args);
    let v = t.cli_json(&all)?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The catalog files of the audit namespace, oldest first.
fn audit_entries(t: &TestMesh) -> anyhow::Result<Vec<PathBuf>> {
    let url = t.ctl.cfg.store_url();
    let dir = Path::new(url.trim_start_matches("file://")).join("catalog/audit");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// Runs `ferry` as `token` until it is refused for its role (not for an unknown token): each
/// service learns a new token when it next polls the registry.
async fn refused_for_role(t: &TestMesh, token: &str, args: &[&str]) -> anyhow::Result<String> {
    for _ in 0..100 {
        let (ok, out, err) = t.cli_as(token, args)?;
        anyhow::ensure!(!ok, "{args:?} should be refused: {out}");
        if err.contains("operator") {
            return Ok(err);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("{args:?} was never refused for the operator role")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_and_refusals_are_listed_and_tampering_is_named() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let made = t.cli_json(&[
        "token", "create", "--name", "alice", "--role", "operator", "-o", "json",
    ])?;
    let alice = text(&made["token"]).to_owned();

    // alice, an operator, tries what needs a contributor (a plan, on the failover service)
    // and an admin (a token, on the registry).
    refused_for_role(&t, &alice, &["plan", "create", "app", "--group", "web01"]).await?;
    refused_for_role(
        &t,
        &alice,
        &["token", "create", "--name", "eve", "--role", "admin"],
    )
    .await?;
    // No token at all.
    let (ok, _, err) = t.cli_as("not-a-token", &["token", "revoke", "alice"])?;
    assert!(!ok, "{err}");

    let mine = trail(&t, &["--caller", "alice"])?;
    let refused = |op: &str, target: &str| {
        mine.iter().any(|r| {
            r["result"] == "refused"
                && r["caller"] == "token:alice"
                && r["role"] == "operator"
                && r["code"] == "PERMISSION_DENIED"
                && r["operation"].as_str().is_some_and(|o| o.ends_with(op))
                && r["target"] == target
        })
    };
    assert!(refused("/CreateRecoveryPlan", "name:app"), "{mine:?}");
    assert!(refused("/CreateToken", "name:eve"), "{mine:?}");
    assert!(
        mine.iter().all(|r| r["caller"] == "token:alice"),
        "--caller filters: {mine:?}"
    );

    let everyone = trail(&t, &[])?;
    let admin_made = everyone.iter().any(|r| {
        r["caller"] == "token:admin"
            && r["operation"] == "ferry.registry.v1.Registry/CreateToken"
            && r["target"] == "name:alice"
            && r["result"] == "ok"
    });
    assert!(admin_made, "the admin's CreateToken of alice: {everyone:?}");
    let anonymous = everyone.iter().any(|r| {
        r["caller"] == "anonymous"
            && r["code"] == "UNAUTHENTICATED"
            && r["operation"] == "ferry.registry.v1.Registry/RevokeToken"
    });
    assert!(anonymous, "the call without a valid token: {everyone:?}");
    for r in &everyone {
        assert!(r["time_ms"].as_u64().is_some_and(|ms| ms > 0), "{r}");
        assert!(
            !r["component"].as_str().unwrap_or_default().is_empty(),
            "{r}"
        );
        let line = r.to_string();
        assert!(!line.contains(&alice), "a token in the trail: {line}");
    }
    // A reader of the trail is not itself audited: listing twice adds nothing.
    let before = audit_entries(&t)?.len();
    trail(&t, &[])?;
    assert_eq!(audit_entries(&t)?.len(), before);

    let verify = t.cli_json(&["audit", "--verify", "-o", "json"])?;
    assert_eq!(verify["intact"], true, "{verify}");
    assert!(verify["records"].as_u64().unwrap_or(0) >= 4, "{verify}");

    // Alter one entry's first record by hand (who made the call), then remove another entry.
    let files = audit_entries(&t)?;
    assert!(files.len() >= 3, "{files:?}");
    let altered = &files[files.len() / 2];
    let text_of = std::fs::read_to_string(altered)?;
    let mut forged: serde_json::Value = serde_json::from_str(&text_of)?;
    let caller = &mut forged["entry"]["records"][0]["caller"];
    assert!(caller.is_string(), "{text_of}");
    *caller = "token:somebody-else".into();
    std::fs::write(altered, forged.to_string())?;
    let out = t.ferry_cli(&["audit", "--verify", "-o", "json"])?;
    assert!(!out.status.success(), "verify fails on an altered entry");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["intact"], false, "{v}");
    let seq = |p: &Path| -> u64 {
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        stem.parse().unwrap_or(u64::MAX)
    };
    let names = |v: &serde_json::Value, what: &str| {
        v["problems"].as_array().into_iter().flatten().any(|p| {
            let p = p.as_str().unwrap_or_default();
            p.contains(&format!("entry {what}"))
        })
    };
    assert!(names(&v, &format!("{} was altered", seq(altered))), "{v}");
    std::fs::write(altered, text_of)?;

    let removed = &files[1];
    std::fs::remove_file(removed)?;
    let (ok, out, _) = t.cli(&["audit", "--verify"])?;
    assert!(!ok, "verify fails on a removed entry: {out}");
    assert!(
        out.contains(&format!("entry {} is missing", seq(removed))),
        "{out}"
    );
    t.stop().await;
    Ok(())
}
