//! Driver kind `libvirt`: a domain XML and `virsh` (Debian: libvirt-clients).
//!
//! Every virsh call gets its arguments as separate words (no shell, so no quoting of VM
//! names) and `LC_ALL=C`, because "domain not found" is recognised by its English message.
use std::fmt::Write as _;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::process::{Finished, Job};
use super::{DriverError, VmRun};

/// How often a stop asks whether the VM is off yet.
const POLL: Duration = Duration::from_secs(1);
/// How often a stop presses the power button again: a guest still booting when the first
/// ACPI event came may have missed it.
const RESEND_SHUTDOWN: Duration = Duration::from_secs(30);

/// The libvirt domain of `run`: `type='test'` for a `test:` URI (libvirt's in-process test
/// driver), `kvm` otherwise; each disk through the tracker's NBD export when it has one (so
/// every write of the recovered VM is logged), else the file; one NIC per spec NIC.
///
/// Every value is XML-escaped; a value XML cannot hold at all (a control character), a VM
/// name that cannot be a file name, an unknown disk format, a VHDX file without an NBD
/// export (libvirt has no VHDX format) or a disk URI that is not NBD is an error rather than
/// a broken or different domain.
pub fn domain_xml(run: &VmRun, uri: &str) -> Result<String, DriverError> {
    let bad = |message: String| DriverError::BadRun {
        vm: run.vm.clone(),
        message,
    };
    if run.vm.is_empty() || run.vm.contains('/') {
        return Err(bad(format!(
            "{:?} cannot be a libvirt domain name (empty, or with '/')",
            run.vm
        )));
    }
    if run.spec.cpus == 0 || run.spec.memory_mib == 0 {
        return Err(bad("the spec has 0 cpus or 0 MiB of memory".into()));
    }
    let x = |what: &str, v: &str| {
        xml_text(v).ok_or_else(|| bad(format!("{what} {v:?} has a character XML cannot hold")))
    };
    let domain_type = if uri.starts_with("test:") {
        "test"
    } else {
        "kvm"
    };
    let mut s = String::new();
    // `write!` into a String cannot fail.
    let _ = writeln!(s, "<domain type='{domain_type}'>");
    let _ = writeln!(s, "  <name>{}</name>", x("the vm name", &run.vm)?);
    let _ = writeln!(
        s,
        "  <description>recovered by ferry ({} network)</description>",
        run.network.as_str()
    );
    let _ = writeln!(s, "  <memory unit='MiB'>{}</memory>", run.spec.memory_mib);
    let _ = writeln!(s, "  <vcpu>{}</vcpu>", run.spec.cpus);
    s.push_str("  <os>\n    <type>hvm</type>\n    <boot dev='hd'/>\n  </os>\n");
    // ACPI, or `virsh shutdown` (the power button) never reaches the guest.
    s.push_str("  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");
    s.push_str("  <devices>\n");
    for (i, d) in run.disks.iter().enumerate() {
        let target = format!("vd{}", dev_suffix(i));
        let path = d
            .path
            .to_str()
            .ok_or_else(|| bad(format!("disk path {} is not UTF-8", d.path.display())))?;
        if d.nbd_uri.is_empty() {
            let driver = match d.format.as_str() {
                "raw" => "raw",
                "vhd" => "vpc",
                // libvirt (9.0 and since) has no VHDX disk format, though qemu reads VHDX.
                "vhdx" => {
                    return Err(bad(format!(
                        "disk {path}: libvirt cannot open a VHDX file; serve it through the tracker (an nbd uri)"
                    )));
                }
                f => {
                    return Err(bad(format!(
                        "disk {path}: unknown format {f:?} (raw, vhd or vhdx)"
                    )));
                }
            };
            let _ = write!(
                s,
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{driver}'/>\n      <source file='{}'/>\n",
                x("disk path", path)?
            );
        } else {
            let nbd = parse_nbd(&d.nbd_uri).ok_or_else(|| {
                bad(format!(
                    "disk {path}: {:?} is not an nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT uri",
                    d.nbd_uri
                ))
            })?;
            // The export is the disk as the guest sees it, whatever the file's format.
            let host = match &nbd.at {
                NbdAt::Unix(sock) => format!(
                    "<host transport='unix' socket='{}'/>",
                    x("nbd socket", sock)?
                ),
                NbdAt::Tcp(h, port) => {
                    format!("<host name='{}' port='{port}'/>", x("nbd host", h)?)
                }
            };
            let _ = write!(
                s,
                "    <disk type='network' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source protocol='nbd' name='{}'>\n        {host}\n      </source>\n",
                x("nbd export", &nbd.export)?
            );
        }
        let _ = writeln!(
            s,
            "      <target dev='{target}' bus='virtio'/>\n    </disk>"
        );
    }
    for nic in &run.spec.nics {
        let _ = writeln!(
            s,
            "    <interface type='network'>\n      <source network='{}'/>\n    </interface>",
            x("network", &nic.network)?
        );
    }
    s.push_str("  </devices>\n</domain>\n");
    Ok(s)
}

/// `a`…`z`, `aa`, `ab`…: the letters of the n-th virtio disk (`vda`, …, `vdaa`), as Linux
/// names them.
fn dev_suffix(mut n: usize) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    String::from_utf8_lossy(&letters).into_owned()
}

/// `v` escaped for an XML attribute or text, or `None` when XML 1.0 cannot hold one of its
/// characters (control characters other than tab and newlines; U+FFFE, U+FFFF).
fn xml_text(v: &str) -> Option<String> {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

#[derive(Debug, PartialEq)]
struct Nbd {
    export: String,
    at: NbdAt,
}

#[derive(Debug, PartialEq)]
enum NbdAt {
    Unix(String),
    Tcp(String, u16),
}

/// `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT` (percent-decoded, as qemu
/// reads them).
fn parse_nbd(uri: &str) -> Option<Nbd> {
    if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
        let (export, query) = rest.split_once('?')?;
        let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="))?;
        let socket = percent_decode(socket)?;
        if !socket.starts_with('/') {
            return None;
        }
        return Some(Nbd {
            export: percent_decode(export)?,
            at: NbdAt::Unix(socket),
        });
    }
    let rest = uri.strip_prefix("nbd://")?;
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = match authority.rsplit_once(':') {
        // `[::1]:10809`, `127.0.0.1:10809`; a colon inside brackets is the address's.
        Some((h, p)) if !p.contains(']') => (h, p.parse().ok()?),
        _ => (authority, 10809),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || export.contains('?') {
        return None;
    }
    Some(Nbd {
        export: percent_decode(export)?,
        at: NbdAt::Tcp(host.to_string(), port),
    })
}

/// `%XX` sequences decoded; `None` when the result is not UTF-8. A `%` not followed by two
/// hex digits stays as it is.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The virsh calls of one start, stop or remove.
struct Virsh<'a> {
    uri: &'a str,
    vm: &'a str,
    action: &'static str,
    deadline: Instant,
    timeout: Duration,
    cancel: &'a CancellationToken,
}

impl Virsh<'_> {
    /// `virsh -c URI ARGS…`, its exit status not checked.
    async fn call(&self, args: &[&str]) -> Result<(Job<'_>, Finished), DriverError> {
        let command = format!("virsh -c {} {}", self.uri, args.join(" "));
        let mut c = tokio::process::Command::new("virsh");
        c.arg("-c").arg(self.uri).args(args).env("LC_ALL", "C");
        let job = Job {
            vm: self.vm,
            action: self.action,
            command,
            deadline: self.deadline,
            timeout: self.timeout,
            cancel: self.cancel,
        };
        let out = job.run_piped(c).await.map_err(virsh_hint)?;
        Ok((job, out))
    }

    async fn checked(&self, args: &[&str]) -> Result<Finished, DriverError> {
        let (job, out) = self.call(args).await?;
        job.check(out)
    }

    /// The domain's state (`running`, `shut off`, …), `None` when libvirt has no such domain.
    async fn state(&self) -> Result<Option<String>, DriverError> {
        let (job, out) = self.call(&["domstate", "--domain", self.vm]).await?;
        if out.status.success() {
            Ok(Some(
                out.stdout.trim().lines().next().unwrap_or("").to_string(),
            ))
        } else if not_found(&out.stderr) {
            Ok(None)
        } else {
            Err(job.failed(&out))
        }
    }
}

fn not_found(stderr: &str) -> bool {
    let e = stderr.to_ascii_lowercase();
    e.contains("domain not found") || e.contains("failed to get domain")
}

/// A missing virsh says which package has it.
fn virsh_hint(e: DriverError) -> DriverError {
    match e {
        DriverError::Spawn {
            vm,
            action,
            command,
            source,
        } if source.kind() == std::io::ErrorKind::NotFound => DriverError::Spawn {
            vm,
            action,
            command,
            source: std::io::Error::new(
                source.kind(),
                format!("{source} (virsh is in Debian's libvirt-clients)"),
            ),
        },
        e => e,
    }
}

/// Writes `<dir>/<vm>.xml`, defines it and starts the domain (unless it already runs).
pub(super) async fn start(
    uri: &str,
    run: &VmRun,
    deadline: Instant,
    cancel: &CancellationToken,
    timeout: Duration,
) -> Result<(), DriverError> {
    let xml = domain_xml(run, uri)?;
    let file = run.dir.join(format!("{}.xml", run.vm));
    let io = |what: String| {
        let vm = run.vm.clone();
        move |source| DriverError::Io { vm, what, source }
    };
    std::fs::create_dir_all(&run.dir).map_err(io(format!("creating {}", run.dir.display())))?;
    super::write_atomic(&file, xml.as_bytes())
        .map_err(io(format!("writing {}", file.display())))?;
    let v = Virsh {
        uri,
        vm: &run.vm,
        action: "start",
        deadline,
        timeout,
        cancel,
    };
    let file_arg = file.to_string_lossy();
    v.checked(&["define", "--file", &file_arg]).await?;
    // A start that is tried again (after a lost answer) finds the domain running.
    if v.state().await?.as_deref() == Some("running") {
        tracing::info!(vm = %run.vm, uri, "the domain is already running");
        return Ok(());
    }
    v.checked(&["start", "--domain", &run.vm]).await?;
    tracing::info!(vm = %run.vm, uri, network = %run.network, "domain started");
    Ok(())
}

/// `virsh shutdown`, then waits for "shut off"; past the deadline the VM is still on and
/// that is an error (nothing here pulls the plug).
pub(super) async fn stop(
    uri: &str,
    run: &VmRun,
    deadline: Instant,
    cancel: &CancellationToken,
    timeout: Duration,
) -> Result<(), DriverError> {
    let v = Virsh {
        uri,
        vm: &run.vm,
        action: "stop",
        deadline,
        timeout,
        cancel,
    };
    let off = |s: &Option<String>| s.as_deref().is_none_or(|s| s == "shut off");
    let state = v.state().await?;
    if off(&state) {
        tracing::info!(vm = %run.vm, uri, defined = state.is_some(), "the domain is not running");
        return Ok(());
    }
    let mut sent = Instant::now();
    let (job, out) = v.call(&["shutdown", "--domain", &run.vm]).await?;
    if !out.status.success() {
        // It may have gone off between the two calls.
        return if off(&v.state().await?) {
            Ok(())
        } else {
            Err(job.failed(&out))
        };
    }
    loop {
        let state = v.state().await?;
        if off(&state) {
            tracing::info!(vm = %run.vm, uri, "domain shut off");
            return Ok(());
        }
        if Instant::now() + POLL >= deadline {
            return Err(DriverError::StillRunning {
                vm: run.vm.clone(),
                state: state.unwrap_or_default(),
                timeout,
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cancel.cancelled() => {
                return Err(DriverError::Cancelled {
                    vm: run.vm.clone(),
                    action: "stop",
                    command: format!("virsh -c {uri} shutdown --domain {}", run.vm),
                });
            }
        }
        if sent.elapsed() >= RESEND_SHUTDOWN {
            sent = Instant::now();
            let _ = v.call(&["shutdown", "--domain", &run.vm]).await?;
        }
    }
}

/// `virsh undefine`; a domain libvirt does not know is already removed.
pub(super) async fn remove(
    uri: &str,
    run: &VmRun,
    deadline: Instant,
    cancel: &CancellationToken,
    timeout: Duration,
) -> Result<(), DriverError> {
    let v = Virsh {
        uri,
        vm: &run.vm,
        action: "remove",
        deadline,
        timeout,
        cancel,
    };
    let (job, out) = v.call(&["undefine", "--domain", &run.vm]).await?;
    if out.status.success() {
        tracing::info!(vm = %run.vm, uri, "domain undefined");
        Ok(())
    } else if not_found(&out.stderr) {
        tracing::info!(vm = %run.vm, uri, "no such domain: nothing to undefine");
        Ok(())
    } else {
        Err(job.failed(&out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_named_as_linux_names_them() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702]
            .into_iter()
            .map(dev_suffix)
            .collect();
        assert_eq!(names, ["a", "b", "z", "aa", "ab", "az", "ba", "zz", "aaa"]);
    }

    #[test]
    fn nbd_uris_are_parsed_and_decoded() {
        assert_eq!(
            parse_nbd("nbd+unix:///web01-os.vhdx?socket=/run/ferry/t.sock"),
            Some(Nbd {
                export: "web01-os.vhdx".into(),
                at: NbdAt::Unix("/run/ferry/t.sock".into())
            })
        );
        assert_eq!(
            parse_nbd("nbd+unix:///a%20b?x=1&socket=/tmp/my%20dir/s"),
            Some(Nbd {
                export: "a b".into(),
                at: NbdAt::Unix("/tmp/my dir/s".into())
            })
        );
        assert_eq!(
            parse_nbd("nbd://127.0.0.1:10810/d0"),
            Some(Nbd {
                export: "d0".into(),
                at: NbdAt::Tcp("127.0.0.1".into(), 10810)
            })
        );
        assert_eq!(
            parse_nbd("nbd://[::1]/d0").map(|n| n.at),
            Some(NbdAt::Tcp("::1".into(), 10809))
        );
        for bad in [
            "nbd+unix:///x",
            "nbd+unix:///x?socket=relative",
            "nbd+unix:///x?socket=/s%ff",
            "nbd://h:port/x",
            "nbd:///x",
            "file:///x",
            "",
        ] {
            assert_eq!(parse_nbd(bad), None, "{bad}");
        }
    }

    #[test]
    fn xml_text_escapes_markup_and_refuses_control_characters() {
        assert_eq!(
            xml_text(r#"a<b>&'c"d"#).as_deref(),
            Some("a&lt;b&gt;&amp;&apos;c&quot;d")
        );
        assert_eq!(xml_text("tab\there").as_deref(), Some("tab\there"));
        assert_eq!(xml_text("100%"), Some("100%".into()));
        assert_eq!(xml_text("nul\0"), None);
        assert_eq!(xml_text("bell\u{7}"), None);
        assert_eq!(xml_text("\u{FFFF}"), None);
    }

    #[test]
    fn a_kvm_uri_makes_a_kvm_domain() {
        let run = VmRun {
            vm: "web01".into(),
            network: super::super::Network::Production,
            spec_path: "/r/spec.json".into(),
            spec: super::super::VmSpec {
                name: "web01".into(),
                cpus: 1,
                memory_mib: 512,
                nics: vec![],
            },
            disks: vec![],
            dir: "/r".into(),
        };
        let xml = domain_xml(&run, "qemu:///system").unwrap();
        assert!(xml.starts_with("<domain type='kvm'>"), "{xml}");
        assert!(xml.contains("production network"), "{xml}");
        let mut zero = run.clone();
        zero.spec.cpus = 0;
        assert!(domain_xml(&zero, "qemu:///system").is_err());
    }
}
