//! Roles and tokens (issue #16): every RPC of every service, found by reflection, is called
//! with grpcurl with a token of each role and with none; what passes must be exactly what the
//! table in `docs/SECURITY.md` says (the expectation comes from the document, not from the
//! code under test). Then tokens themselves: shown once, stored only hashed, refused
//! everywhere once revoked, and the CLI with `FERRY_TOKEN`.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ferry::up::GRPC_COMPONENTS;
use ferry_tests::*;

const ROLES: [&str; 4] = ["reader", "operator", "contributor", "admin"];

/// `Service/Method` → least token role ("reader" … "admin", "none" or "any"), from the docs.
fn documented() -> anyhow::Result<BTreeMap<String, String>> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/SECURITY.md");
    let text = std::fs::read_to_string(&doc)?;
    let mut table = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with("`ferry.") {
            continue;
        }
        let rpc = cells[1].trim_matches('`').to_owned();
        let who = cells[2].to_owned();
        anyhow::ensure!(
            ROLES.contains(&who.as_str()) || who == "none" || who == "any",
            "{rpc}: unknown role {who:?} in the table"
        );
        anyhow::ensure!(table.insert(rpc.clone(), who).is_none(), "{rpc} twice");
    }
    anyhow::ensure!(table.len() > 50, "the table in {doc:?} was not found");
    Ok(table)
}

fn grpcurl(t: &TestMesh, token: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new("grpcurl");
    cmd.arg("-cacert").arg(&t.ctl.cfg.tls.ca_cert);
    cmd.args(["-max-time", "20"]);
    if let Some(tok) = token {
        cmd.args(["-H", &format!("authorization: Bearer {tok}")]);
    }
    let out = cmd.args(args).output().expect("grpcurl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The gRPC code grpcurl printed ("OK" when the call succeeded).
fn code(ok: bool, out: &str) -> String {
    if ok {
        return "OK".into();
    }
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Code: "))
        .unwrap_or("no code")
        .to_owned()
}

/// Every `ferry.*` method each port serves, by reflection: (address, `Service/Method`).
fn served_methods(t: &TestMesh) -> anyhow::Result<Vec<(String, String)>> {
    let mut all = Vec::new();
    for c in GRPC_COMPONENTS {
        let addr = grpc_addr(t, c);
        let (ok, services) = grpcurl(t, None, &[&addr, "list"]);
        anyhow::ensure!(ok, "{c}: {services}");
        for svc in services.lines().filter(|s| s.starts_with("ferry.")) {
            let (ok, methods) = grpcurl(t, None, &[&addr, "list", svc]);
            anyhow::ensure!(ok, "{svc}: {methods}");
            for m in methods.lines().filter(|m| !m.trim().is_empty()) {
                let name = m.trim().rsplit('.').next().unwrap_or_default();
                all.push((addr.clone(), format!("{svc}/{name}")));
            }
        }
    }
    Ok(all)
}

/// What a caller with `role` (None: no token) must see for a call needing `least`.
fn judge(least: &str, role: Option<&str>, got: &str) -> Result<(), String> {
    let refused = got == "PermissionDenied" || got == "Unauthenticated";
    let rank = |r: &str| ROLES.iter().position(|x| *x == r);
    let want_ok = match (least, role) {
        ("any", _) => true,
        (_, None) | ("none", _) => false,
        (least, Some(r)) => rank(r) >= rank(least),
    };
    let fine = match (want_ok, role) {
        (true, _) => !refused,
        (false, None) => got == "Unauthenticated",
        (false, Some(_)) => got == "PermissionDenied",
    };
    if fine {
        Ok(())
    } else {
        let want = if want_ok { "let through" } else { "refused" };
        Err(format!("should be {want}, got {got}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_lets_through_exactly_the_roles_the_table_allows() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let table = documented()?;
    let mut tokens = BTreeMap::new();
    for role in ROLES {
        let made = t.cli_json(&[
            "token",
            "create",
            "--name",
            &format!("t-{role}"),
            "--role",
            role,
            "-o",
            "json",
        ])?;
        assert_eq!(made["role"], role, "{made}");
        assert!(made["expires"].is_null(), "{made}");
        tokens.insert(role, text(&made["token"]).to_owned());
    }
    // Every service knows the tokens once it has polled the registry.
    until_every_service(&t, &tokens["reader"], |c| c != "Unauthenticated").await?;
    let served = served_methods(&t)?;
    let names: Vec<&String> = served.iter().map(|(_, m)| m).collect();
    let listed: Vec<&String> = table.keys().collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, listed, "the RPCs served and the table differ");

    // One thread per service port keeps the ~370 grpcurl runs short.
    let failures: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = GRPC_COMPONENTS
            .iter()
            .map(|c| {
                let addr = grpc_addr(&t, *c);
                let (t, table, tokens, served) = (&t, &table, &tokens, &served);
                s.spawn(move || {
                    let mut bad = Vec::new();
                    for (_, rpc) in served.iter().filter(|(a, _)| *a == addr) {
                        let callers = std::iter::once(None).chain(ROLES.iter().map(Some));
                        for role in callers {
                            let tok = role.map(|r| tokens[r].as_str());
                            let (ok, out) = grpcurl(t, tok, &["-d", "{}", &addr, rpc]);
                            let got = code(ok, &out);
                            if let Err(e) = judge(&table[rpc], role.copied(), &got) {
                                let who = role.copied().unwrap_or("no token");
                                bad.push(format!("{rpc} as {who}: {e} ({})", out.trim()));
                            }
                        }
                    }
                    bad
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    t.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_shown_once_stored_hashed_and_refused_once_revoked() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let made = t.cli_json(&[
        "token",
        "create",
        "--name",
        "alice",
        "--role",
        "reader",
        "--expires",
        "30d",
        "-o",
        "json",
    ])?;
    for field in ["name", "role", "token", "expires"] {
        assert!(!made[field].is_null(), "{field}: {made}");
    }
    let token = text(&made["token"]).to_owned();
    assert!(token.len() >= 40, "{made}");

    // Values out of range are refused with the range, not changed.
    let (ok, _, err) = t.cli(&[
        "token",
        "create",
        "--name",
        "b",
        "--role",
        "reader",
        "--expires",
        "30s",
    ])?;
    assert!(!ok && err.contains("60 s to"), "{err}");
    let (ok, _, err) = t.cli(&["token", "create", "--name", "b", "--role", "root"])?;
    assert!(
        !ok && err.contains("reader, operator, contributor or admin"),
        "{err}"
    );
    let (ok, _, err) = t.cli(&["token", "create", "--name", "alice", "--role", "admin"])?;
    assert!(!ok && err.contains("exists"), "{err}");

    // Listed by name and role, never the token; the store holds no copy of it.
    let (ok, list, _) = t.cli(&["token", "list", "-o", "json"])?;
    assert!(
        ok && list.contains("alice") && !list.contains(&token),
        "{list}"
    );
    let data = t.ctl.cfg.store_url();
    let store = Path::new(data.trim_start_matches("file://"));
    for f in walk(store) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        let found = bytes.windows(token.len()).any(|w| w == token.as_bytes());
        assert!(!found, "the token is written in {}", f.display());
    }

    // The CLI with the reader token (once every service has polled it): views, but changes
    // nothing, and says which role.
    until_every_service(&t, &token, |c| c != "Unauthenticated").await?;
    let (ok, out, err) = t.cli_as(&token, &["vm", "list", "-o", "json"])?;
    assert!(ok, "{out}{err}");
    let (ok, _, err) = t.cli_as(&token, &["plan", "create", "p", "--group", "x"])?;
    assert!(
        !ok && err.contains("contributor") && err.contains("reader"),
        "{err}"
    );
    assert!(!err.contains(&token), "{err}");
    let (ok, _, err) = t.cli_as(&token, &["token", "list"])?;
    assert!(!ok && err.contains("admin"), "{err}");

    // Revoked: refused by every service within its poll interval.
    let (ok, out, err) = t.cli(&["token", "revoke", "alice"])?;
    assert!(ok, "{out}{err}");
    until_every_service(&t, &token, |c| c == "Unauthenticated").await?;
    let (ok, list, _) = t.cli(&["token", "list", "-o", "json"])?;
    assert!(ok && list.contains("\"revoked\": true"), "{list}");
    let (ok, _, err) = t.cli(&["token", "revoke", "alice"])?;
    assert!(!ok && err.contains("already revoked"), "{err}");
    // The name is free again once revoked.
    t.cli_json(&[
        "token", "create", "--name", "alice", "--role", "operator", "-o", "json",
    ])?;
    t.stop().await;
    Ok(())
}

/// Waits (up to 20 s) until a reading call with `token` gets a code `done` accepts on every
/// service port.
async fn until_every_service(
    t: &TestMesh,
    token: &str,
    done: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let reads = [
        "ferry.registry.v1.Registry/ListVms",
        "ferry.scheduler.v1.Scheduler/ListQueue",
        "ferry.ingest.v1.Ingest/GetCycle",
        "ferry.storage.v1.StorageWriter/HasChunks",
        "ferry.failover.v1.Failover/ListFailovers",
    ];
    for (c, rpc) in GRPC_COMPONENTS.iter().zip(reads) {
        let addr = grpc_addr(t, *c);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, out) = grpcurl(t, Some(token), &["-d", "{}", &addr, rpc]);
            if done(&code(ok, &out)) {
                break;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "{c}: {out}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// A component's `host:port`, as grpcurl takes it.
fn grpc_addr(t: &TestMesh, c: ferry_mesh::Component) -> String {
    t.ctl
        .cfg
        .endpoint(c)
        .trim_start_matches("https://")
        .to_owned()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
