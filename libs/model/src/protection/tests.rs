use super::*;

fn p(state: VmState) -> Protection {
    Protection {
        state,
        health: Health::Normal,
        test_failover: TestFailover::None,
        direction: Direction::Forward,
        has_points: true,
    }
}

fn names(ops: &[Operation]) -> Vec<&'static str> {
    ops.iter().map(|o| o.as_str()).collect()
}

#[test]
fn names_round_trip_as_the_catalog_spells_them() {
    for s in VmState::ALL {
        assert_eq!(s.as_str().parse::<VmState>().unwrap(), *s);
        let json = serde_json::to_string(s).unwrap();
        assert_eq!(json, format!("\"{}\"", s.as_str()));
        assert_eq!(serde_json::from_str::<VmState>(&json).unwrap(), *s);
    }
    assert_eq!(VmState::ResyncPending.as_str(), "resync-pending");
    assert_eq!(VmState::InitialReplication.as_str(), "initial-replication");
    for o in Operation::ALL {
        assert_eq!(o.as_str().parse::<Operation>().unwrap(), *o);
    }
    let err = "sleeping".parse::<VmState>().unwrap_err();
    assert!(err.to_string().contains("resync-pending"), "{err}");
    assert!(serde_json::from_str::<Health>("\"fine\"").is_err());
}

#[test]
fn every_state_has_its_table_row() {
    let row = |s| names(&allowed_operations(&p(s)));
    assert_eq!(
        row(VmState::Unprotected),
        ["enable-protection", "test-failover"]
    );
    assert_eq!(
        row(VmState::Protected),
        [
            "disable-protection",
            "update-policy",
            "test-failover",
            "planned-failover",
            "unplanned-failover",
            "resync",
            "repair"
        ]
    );
    assert_eq!(row(VmState::Enabling), ["disable-protection"]);
    assert_eq!(row(VmState::FailedOver), ["change-point", "commit"]);
    assert_eq!(
        row(VmState::FailoverCommitted),
        ["disable-protection", "reprotect"]
    );
    assert_eq!(row(VmState::FailingBack), ["complete-failback"]);
    for busy in [
        VmState::FailingOver,
        VmState::Reprotecting,
        VmState::Unprotecting,
    ] {
        assert!(row(busy).is_empty(), "{busy}: {:?}", row(busy));
    }
    // Every state is in the table (no state allows an operation by accident of a default).
    for s in VmState::ALL {
        let _ = row(*s);
    }
}

#[test]
fn conditions_beyond_the_state() {
    let fresh = Protection {
        has_points: false,
        ..p(VmState::Unprotected)
    };
    assert_eq!(names(&allowed_operations(&fresh)), ["enable-protection"]);
    let active = Protection {
        test_failover: TestFailover::Active,
        ..p(VmState::Protected)
    };
    let ops = allowed_operations(&active);
    assert!(
        ops.contains(&Operation::CleanupTestFailover) && !ops.contains(&Operation::TestFailover)
    );
    let critical = Protection {
        health: Health::Critical,
        ..p(VmState::Protected)
    };
    let ops = allowed_operations(&critical);
    assert!(
        !ops.contains(&Operation::PlannedFailover),
        "planned needs a healthy source"
    );
    assert!(ops.contains(&Operation::UnplannedFailover) && ops.contains(&Operation::Repair));
    let reverse = Protection {
        direction: Direction::Reverse,
        ..p(VmState::Protected)
    };
    let ops = allowed_operations(&reverse);
    assert!(ops.contains(&Operation::Failback) && !ops.contains(&Operation::PlannedFailover));
}

#[test]
fn refusals_name_vm_state_and_what_is_allowed() {
    let fresh = Protection {
        has_points: false,
        ..p(VmState::Unprotected)
    };
    let err = fresh.check("web01", Operation::TestFailover).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("web01")
            && msg.contains("unprotected")
            && msg.contains("test-failover")
            && msg.contains("allowed: enable-protection"),
        "{msg}"
    );
    let busy = p(VmState::FailingOver)
        .check("web01", Operation::Commit)
        .unwrap_err();
    assert!(
        busy.to_string()
            .contains("nothing until the running job ends")
    );
}

fn apply(from: (VmState, Health), t: Transition) -> Result<Lifecycle, Refused> {
    Lifecycle::new(from.0, from.1, "").apply("web01", &p(from.0), &t)
}

#[test]
fn protection_runs_from_unprotected_to_protected() {
    use Health::*;
    use VmState::*;
    let l = apply((Unprotected, Critical), Transition::ProtectionStarted).unwrap();
    assert_eq!((l.state, l.health), (Enabling, Normal));
    let l = apply((Enabling, Normal), Transition::InitialReplicationStarted).unwrap();
    assert_eq!(l.state, InitialReplication);
    let l = apply(
        (InitialReplication, Warning),
        Transition::ProtectionFinalized,
    )
    .unwrap();
    assert_eq!((l.state, l.health), (Protected, Normal));
    let err = apply((Protected, Normal), Transition::ProtectionStarted).unwrap_err();
    assert_eq!(err.state, Protected);
    let l = apply(
        (Enabling, Normal),
        Transition::ProtectionFailed {
            error: "disk gone".into(),
        },
    )
    .unwrap();
    assert_eq!(
        (l.state, l.health, l.last_error.as_str()),
        (Unprotected, Critical, "disk gone")
    );
}

#[test]
fn errors_move_health_and_resync_as_replication_reports_them() {
    use Health::*;
    use VmState::*;
    let e = || "log chain broken".to_string();
    let l = apply(
        (Protected, Normal),
        Transition::ResyncRequired { error: e() },
    )
    .unwrap();
    assert_eq!((l.state, l.health), (ResyncPending, Warning));
    let l = apply(
        (InitialReplication, Normal),
        Transition::ResyncRequired { error: e() },
    )
    .unwrap();
    assert_eq!((l.state, l.health), (InitialReplication, Critical));
    let l = apply(
        (Protected, Normal),
        Transition::RecoverableError { error: e() },
    )
    .unwrap();
    assert_eq!((l.state, l.health), (Protected, Warning));
    let l = apply((Protected, Warning), Transition::PointCommitted).unwrap();
    assert_eq!((l.state, l.health), (Protected, Normal));
    let l = apply((Protected, Critical), Transition::PointCommitted).unwrap();
    assert_eq!(l.health, Critical, "critical waits for a repair");
    let l = apply((ResyncPending, Warning), Transition::ResyncStarted).unwrap();
    assert_eq!((l.state, l.health), (Resyncing, Warning));
    let l = apply((Resyncing, Warning), Transition::ResyncCommitted).unwrap();
    assert_eq!((l.state, l.health), (Protected, Normal));
    assert!(apply((Unprotected, Normal), Transition::ResyncStarted).is_err());
    let l = apply((Protected, Critical), Transition::Repaired).unwrap();
    assert_eq!((l.state, l.health), (Protected, Normal));
    assert!(apply((Enabling, Critical), Transition::Repaired).is_err());
    let l = apply((Protected, Normal), Transition::HostRemoved { error: e() }).unwrap();
    assert_eq!(l.health, Critical);
    assert!(
        apply(
            (Unprotected, Normal),
            Transition::HostRemoved { error: e() }
        )
        .is_err()
    );
}

#[test]
fn failover_runs_from_protected_to_committed() {
    use Health::*;
    use VmState::*;
    let planned = Transition::FailoverStarted { planned: true };
    let unplanned = Transition::FailoverStarted { planned: false };
    let l = apply((Protected, Normal), planned.clone()).unwrap();
    assert_eq!((l.state, l.health), (FailingOver, Normal));
    // Planned needs a healthy protected VM; unplanned takes any replicating one with points.
    assert!(apply((ResyncPending, Warning), planned.clone()).is_err());
    assert!(apply((Protected, Critical), planned).is_err());
    assert_eq!(
        apply((ResyncPending, Warning), unplanned.clone())
            .unwrap()
            .state,
        FailingOver
    );
    let l = apply((FailingOver, Normal), Transition::FailedOver).unwrap();
    assert_eq!(l.state, FailedOver);
    assert_eq!(
        apply((FailedOver, Normal), Transition::PointChanged)
            .unwrap()
            .state,
        FailedOver
    );
    let l = apply((FailedOver, Normal), Transition::FailoverCommitted).unwrap();
    assert_eq!(l.state, FailoverCommitted);
    // After the commit the point is fixed, and nothing fails over twice.
    let err = apply((FailoverCommitted, Normal), Transition::PointChanged).unwrap_err();
    assert!(err.to_string().contains("failover-committed"), "{err}");
    assert!(apply((FailedOver, Normal), unplanned).is_err());
    assert!(apply((Protected, Normal), Transition::FailedOver).is_err());
    let l = apply(
        (FailingOver, Normal),
        Transition::FailoverFailed {
            error: "recovery host gone".into(),
        },
    )
    .unwrap();
    assert_eq!(
        (l.state, l.health, l.last_error.as_str()),
        (Protected, Critical, "recovery host gone")
    );
}

#[test]
fn disable_protection_runs_to_unprotected() {
    use Health::*;
    use VmState::*;
    for from in [
        Enabling,
        InitialReplication,
        Protected,
        ResyncPending,
        Resyncing,
        FailoverCommitted,
        Error,
    ] {
        let l = apply((from, Critical), Transition::UnprotectStarted).unwrap();
        assert_eq!((l.state, l.health), (Unprotecting, Normal), "{from}");
    }
    for from in [Unprotected, FailingOver, FailedOver, Unprotecting] {
        let err = apply((from, Normal), Transition::UnprotectStarted).unwrap_err();
        assert!(err.to_string().contains(from.as_str()), "{err}");
        assert_eq!(err.asked, "disable-protection");
    }
    let l = apply((Unprotecting, Normal), Transition::Unprotected).unwrap();
    assert_eq!(
        (l.state, l.health, l.last_error.as_str()),
        (Unprotected, Normal, "")
    );
    assert!(apply((Protected, Normal), Transition::Unprotected).is_err());
    // Nothing is allowed while the job runs; a failed one leaves the VM in error, from where
    // disabling again is allowed.
    assert!(allowed_operations(&p(Unprotecting)).is_empty());
    let l = apply(
        (Unprotecting, Normal),
        Transition::UnprotectFailed {
            error: "host gone".into(),
        },
    )
    .unwrap();
    assert_eq!((l.state, l.health), (Error, Critical));
    assert!(apply((Error, Critical), Transition::UnprotectStarted).is_ok());
    assert!(
        apply(
            (Protected, Normal),
            Transition::UnprotectFailed { error: "x".into() }
        )
        .is_err()
    );
}

#[test]
fn cancelled_protection_and_resync_go_back_without_failing() {
    use Health::*;
    use VmState::*;
    for from in [Enabling, InitialReplication] {
        let l = apply((from, Normal), Transition::ProtectionCancelled).unwrap();
        assert_eq!((l.state, l.health), (Unprotected, Normal), "from {from}");
    }
    // Finalized: nothing to cancel any more.
    assert!(apply((Protected, Normal), Transition::ProtectionCancelled).is_err());
    let l = apply((Resyncing, Warning), Transition::ResyncCancelled).unwrap();
    assert_eq!((l.state, l.health), (ResyncPending, Warning));
    assert!(l.last_error.contains("cancelled"), "{}", l.last_error);
    assert!(apply((Protected, Normal), Transition::ResyncCancelled).is_err());
}

fn apply_in(
    from: (VmState, Health),
    direction: Direction,
    t: Transition,
) -> Result<Lifecycle, Refused> {
    let ctx = Protection {
        direction,
        ..p(from.0)
    };
    Lifecycle::new(from.0, from.1, "").apply("web01", &ctx, &t)
}

#[test]
fn the_round_trip_reprotects_fails_back_and_reprotects_again() {
    use Direction::*;
    use Health::*;
    use VmState::*;
    let l = apply_in(
        (FailoverCommitted, Normal),
        Forward,
        Transition::Reprotected,
    )
    .unwrap();
    assert_eq!((l.state, l.health), (Protected, Normal));
    // Replicating back home: failback is offered, a planned failover (forward) is not.
    let reverse = allowed_operations(&Protection {
        direction: Reverse,
        ..p(Protected)
    });
    assert!(reverse.contains(&Operation::Failback), "{reverse:?}");
    assert!(
        !reverse.contains(&Operation::PlannedFailover),
        "{reverse:?}"
    );
    assert!(apply_in((Protected, Normal), Forward, Transition::FailbackStarted).is_err());
    let l = apply_in((Protected, Normal), Reverse, Transition::FailbackStarted).unwrap();
    assert_eq!(l.state, FailingBack);
    // Phase 1 failing leaves the vm where it runs, protected, with the reason.
    let failed = Transition::FailbackFailed {
        error: "target unreachable".into(),
    };
    let l = apply_in((FailingBack, Normal), Reverse, failed.clone()).unwrap();
    assert_eq!(
        (l.state, l.health, l.last_error.as_str()),
        (Protected, Warning, "target unreachable")
    );
    assert!(apply_in((Protected, Normal), Reverse, failed).is_err());
    let l = apply_in((FailingBack, Normal), Reverse, Transition::FailbackCutover).unwrap();
    assert_eq!(l.state, FailingOver);
    assert!(apply_in((Protected, Normal), Reverse, Transition::FailbackCutover).is_err());
    // Then as any failover: failed over, commit, re-protect (forward again).
    let l = apply_in((FailingOver, Normal), Reverse, Transition::FailedOver).unwrap();
    let l = apply_in((l.state, l.health), Reverse, Transition::FailoverCommitted).unwrap();
    let l = apply_in((l.state, l.health), Reverse, Transition::Reprotected).unwrap();
    assert_eq!(l.state, Protected);
    let err = apply_in((Protected, Normal), Reverse, Transition::Reprotected).unwrap_err();
    assert!(
        err.to_string().contains("reprotect is not allowed"),
        "{err}"
    );
}
