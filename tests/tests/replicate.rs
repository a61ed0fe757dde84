//! Protect VMs with raw, dynamic VHD and dynamic VHDX disks made by qemu, replicate them over
//! QUIC into object storage, test-fail them over and compare with `qemu-img compare`.
use std::time::Duration;

use ferry_proto::common::v1::Consistency;
use ferry_proto::common::v1::StepStatus;
use ferry_proto::failover::v1::CleanupTestFailoverRequest;
use ferry_proto::registry::v1::VmState;
use ferry_proto::storage::v1::ListPointsRequest;
use ferry_tests::*;

struct Case {
    vm: &'static str,
    file: &'static str,
    fmt: &'static str,
    opts: &'static str,
}

const CASES: [Case; 3] = [
    Case {
        vm: "raw01",
        file: "raw01-os.raw",
        fmt: "raw",
        opts: "",
    },
    Case {
        vm: "vhd01",
        file: "vhd01-os.vhd",
        fmt: "vpc",
        opts: "subformat=dynamic",
    },
    Case {
        vm: "vhdx01",
        file: "vhdx01-os.vhdx",
        fmt: "vhdx",
        opts: "subformat=dynamic",
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_vhd_vhdx_replicate_and_test_failover_identical() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disks = t.path("host");
    std::fs::create_dir_all(&disks)?;
    let mut vms = Vec::new();
    for c in &CASES {
        let p = disks.join(c.file);
        qemu_create(&p, c.fmt, c.opts, "48M")?;
        // Patterns across block boundaries, a zero-write over data, data at the very end.
        qemu_io(
            &p,
            c.fmt,
            &[
                "write -P 0xab 0 1536k",
                "write -P 0xcd 5M 4k",
                "write -z 512k 256k",
                "write -P 0x11 30M 3M",
                "write -P 0x7e 47M 1M",
            ],
        )?;
        vms.push((c.vm, vec![p]));
    }
    let agent_cfg = t
        .agent_config_tracked(&t.path("agent"), "hv01", &vms)
        .await?;
    let agent = InProcessAgent::start(&agent_cfg)?;
    for c in &CASES {
        t.wait_vm(c.vm).await?;
    }
    let mut jobs = Vec::new();
    for c in &CASES {
        jobs.push(t.protect(c.vm).await?);
    }
    for (c, job) in CASES.iter().zip(&jobs) {
        let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
        assert_eq!(j.status, StepStatus::Succeeded as i32, "{}: {j:?}", c.vm);
        assert_eq!(j.steps.len(), 4);
        assert!(
            j.steps
                .iter()
                .all(|s| s.status == StepStatus::Succeeded as i32),
            "{j:?}"
        );
        let vm = t.vm(c.vm).await?;
        assert_eq!(vm.state(), VmState::Protected);
        let points = t
            .ctl
            .storage()
            .await?
            .list_points(ListPointsRequest { vm: c.vm.into() })
            .await?
            .into_inner()
            .points;
        assert_eq!(points.len(), 1, "{}: one initial point", c.vm);
        assert_eq!(points[0].consistency(), Consistency::Crash);
    }
    for c in &CASES {
        let out = t.path(&format!("failover-{}", c.vm));
        let job = t.test_failover(c.vm, "latest", &out).await?;
        assert_eq!(
            job.status,
            StepStatus::Succeeded as i32,
            "{}: {job:?}",
            c.vm
        );
        let src = disks.join(c.file);
        let copy = out.join(c.file);
        assert!(copy.exists(), "test failover wrote {}", copy.display());
        assert!(
            out.join(format!("{}.vm.json", c.vm)).exists(),
            "vm description written"
        );
        assert!(
            qemu_compare(&src, c.fmt, &copy, c.fmt)?,
            "{}: recovered disk differs",
            c.vm
        );
        assert_eq!(
            qemu_virtual_size(&src, c.fmt)?,
            qemu_virtual_size(&copy, c.fmt)?
        );
        let job = t
            .ctl
            .failover()
            .await?
            .cleanup_test_failover(CleanupTestFailoverRequest { vm: c.vm.into() })
            .await?
            .into_inner();
        assert_eq!(job.status, StepStatus::Succeeded as i32, "{job:?}");
        assert!(!copy.exists(), "cleanup removed the test copy");
    }
    // The failover jobs show in the vault's job list next to the protection jobs.
    let all = t
        .ctl
        .registry()
        .await?
        .list_jobs(ferry_proto::registry::v1::ListJobsRequest::default())
        .await?
        .into_inner()
        .jobs;
    assert!(all.iter().filter(|j| j.kind == "enable-protection").count() == 3);
    assert!(all.iter().any(|j| j.kind == "test-failover"));
    agent.shutdown().await?;
    t.stop().await;
    Ok(())
}
