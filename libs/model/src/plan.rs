//! Recovery plans: ordered groups of VMs with actions before and after each group (DESIGN
//! §11). The one type of a plan, converted from and to `ferry.failover.v1.RecoveryPlan` here
//! and checked by [`Plan::problem`] before anything stores or runs it.
use std::collections::HashSet;

use ferry_proto::failover::v1 as pb;
use serde::{Deserialize, Serialize};

/// Most VMs a plan may hold (ASR's limit, and what one plan job's steps stay readable at).
pub const MAX_PLAN_VMS: usize = 100;
/// Longest a plan's script action may run before it is killed (and fails).
pub const SCRIPT_TIMEOUT_SECS: u64 = 600;

named_enum! {
    /// What an action does: a script (`sh -c` on the recovery host) or a manual step (the
    /// job waits until an operator resumes it).
    ActionKind { Script => "script", Manual => "manual" }
}

named_enum! {
    /// What a plan job does with every VM of the plan, group by group.
    PlanMode {
        Test => "test",
        Planned => "planned",
        Unplanned => "unplanned",
        Cleanup => "cleanup",
        Failback => "failback",
    }
}

impl PlanMode {
    /// Whether the job runs the groups' actions (a cleanup only removes test copies).
    pub fn runs_actions(self) -> bool {
        self != PlanMode::Cleanup
    }

    /// Whether a failure stops the job at the failing group. An unplanned failover is the
    /// disaster case: it brings up every VM it can and reports every failure at the end.
    pub fn stops_at_failure(self) -> bool {
        self != PlanMode::Unplanned
    }

    /// The job kind in the registry ("plan-planned", "plan-failback", ...).
    pub fn job_kind(self) -> String {
        format!("plan-{}", self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    #[serde(default)]
    pub name: String,
    pub kind: ActionKind,
    /// The script's command line, or the manual action's instruction.
    pub command: String,
}

impl Action {
    /// What the job's step calls the action.
    pub fn label(&self) -> String {
        let what = if self.name.is_empty() {
            &self.command
        } else {
            &self.name
        };
        format!("{} {what:?}", self.kind)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub vms: Vec<String>,
    #[serde(default)]
    pub before: Vec<Action>,
    #[serde(default)]
    pub after: Vec<Action>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub groups: Vec<Group>,
    #[serde(default)]
    pub created_at_ms: i64,
    /// Its VMs are in the replication group named after the plan (cut at one instant).
    #[serde(default)]
    pub consistent: bool,
}

/// Whether `name` may name a replication group (`ferry vm set --group`; a consistent plan's
/// group is the plan's name): the plan name rule.
pub fn group_name_problem(name: &str) -> Option<String> {
    plan_name_problem(name).map(|_| {
        format!("replication group {name:?} is not valid: 1 to 64 of A-Z a-z 0-9 - _ . (not starting with .)")
    })
}

/// Whether `name` may name a plan: 1-64 of `A-Z a-z 0-9 - _ .`, not starting with `.`.
pub fn plan_name_problem(name: &str) -> Option<String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with('.') {
        return Some(format!(
            "plan name {name:?} is not valid: 1 to 64 of A-Z a-z 0-9 - _ . (not starting with .)"
        ));
    }
    None
}

impl Plan {
    /// What is wrong with the plan, in words; `None` when it may be stored.
    pub fn problem(&self) -> Option<String> {
        if let Some(p) = plan_name_problem(&self.name) {
            return Some(p);
        }
        if self.groups.is_empty() {
            return Some(format!("plan {} has no group", self.name));
        }
        let mut seen = HashSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            let n = i + 1;
            if g.vms.is_empty() {
                return Some(format!("plan {}: group {n} is empty", self.name));
            }
            for vm in &g.vms {
                if vm.trim().is_empty() {
                    return Some(format!("plan {}: group {n} names an empty vm", self.name));
                }
                if !seen.insert(vm.as_str()) {
                    return Some(format!(
                        "plan {}: vm {vm} is in the plan twice (group {n})",
                        self.name
                    ));
                }
            }
            for a in g.before.iter().chain(&g.after) {
                if a.command.trim().is_empty() {
                    return Some(format!(
                        "plan {}: group {n} has a {} action without {}",
                        self.name,
                        a.kind,
                        match a.kind {
                            ActionKind::Script => "a command",
                            ActionKind::Manual => "an instruction",
                        }
                    ));
                }
            }
        }
        if seen.len() > MAX_PLAN_VMS {
            return Some(format!(
                "plan {} has {} vms; a plan holds at most {MAX_PLAN_VMS}",
                self.name,
                seen.len()
            ));
        }
        None
    }

    pub fn vms(&self) -> impl Iterator<Item = &str> {
        self.groups
            .iter()
            .flat_map(|g| g.vms.iter().map(String::as_str))
    }

    pub fn has_action(&self, kind: ActionKind) -> bool {
        self.groups
            .iter()
            .flat_map(|g| g.before.iter().chain(&g.after))
            .any(|a| a.kind == kind)
    }
}

/// Parses `--before/--after GROUP:KIND:COMMAND` (GROUP 1-based): the group's index from 0
/// and the action.
pub fn parse_action_flag(flag: &str) -> Result<(usize, Action), String> {
    let bad = || {
        format!(
            "{flag:?} is not GROUP:KIND:COMMAND (GROUP from 1, KIND script or manual), e.g. 2:script:./check-db.sh"
        )
    };
    let mut parts = flag.splitn(3, ':');
    let (Some(group), Some(kind), Some(command)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let group: usize = group.trim().parse().map_err(|_| bad())?;
    if group == 0 {
        return Err(bad());
    }
    let kind: ActionKind = kind
        .trim()
        .parse()
        .map_err(|e: crate::UnknownName| e.to_string())?;
    Ok((
        group - 1,
        Action {
            name: String::new(),
            kind,
            command: command.to_owned(),
        },
    ))
}

impl TryFrom<&pb::RecoveryPlan> for Plan {
    type Error = String;

    fn try_from(p: &pb::RecoveryPlan) -> Result<Self, String> {
        let action = |a: &pb::PlanAction| -> Result<Action, String> {
            Ok(Action {
                name: a.name.clone(),
                kind: a
                    .kind
                    .parse()
                    .map_err(|e: crate::UnknownName| e.to_string())?,
                command: a.command.clone(),
            })
        };
        let groups = p
            .groups
            .iter()
            .map(|g| {
                Ok(Group {
                    vms: g.vms.clone(),
                    before: g.before.iter().map(action).collect::<Result<_, String>>()?,
                    after: g.after.iter().map(action).collect::<Result<_, String>>()?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Plan {
            name: p.name.clone(),
            groups,
            created_at_ms: p.created_at_ms,
            consistent: p.consistent,
        })
    }
}

impl From<&Plan> for pb::RecoveryPlan {
    fn from(p: &Plan) -> Self {
        let action = |a: &Action| pb::PlanAction {
            name: a.name.clone(),
            kind: a.kind.as_str().to_owned(),
            command: a.command.clone(),
        };
        pb::RecoveryPlan {
            name: p.name.clone(),
            groups: p
                .groups
                .iter()
                .map(|g| pb::PlanGroup {
                    vms: g.vms.clone(),
                    before: g.before.iter().map(action).collect(),
                    after: g.after.iter().map(action).collect(),
                })
                .collect(),
            created_at_ms: p.created_at_ms,
            consistent: p.consistent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(groups: &[&[&str]]) -> Plan {
        Plan {
            name: "app".into(),
            groups: groups
                .iter()
                .map(|g| Group {
                    vms: g.iter().map(|s| (*s).to_owned()).collect(),
                    ..Group::default()
                })
                .collect(),
            created_at_ms: 0,
            consistent: false,
        }
    }

    #[test]
    fn bad_plans_are_refused_naming_what_is_wrong() {
        assert_eq!(plan(&[&["db1", "db2"], &["web1"]]).problem(), None);
        let twice = plan(&[&["db1"], &["web1", "db1"]]).problem().unwrap();
        assert!(
            twice.contains("db1 is in the plan twice (group 2)"),
            "{twice}"
        );
        let empty = plan(&[&["db1"], &[]]).problem().unwrap();
        assert!(empty.contains("group 2 is empty"), "{empty}");
        assert!(plan(&[]).problem().unwrap().contains("no group"));
        let mut bad_name = plan(&[&["db1"]]);
        bad_name.name = "../x".into();
        assert!(bad_name.problem().unwrap().contains("not valid"));
        let many: Vec<String> = (0..=MAX_PLAN_VMS).map(|i| format!("vm{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let big = plan(&[&refs]).problem().unwrap();
        assert!(big.contains("at most 100"), "{big}");
        let mut no_cmd = plan(&[&["db1"]]);
        no_cmd.groups[0].after.push(Action {
            name: String::new(),
            kind: ActionKind::Manual,
            command: " ".into(),
        });
        assert!(no_cmd.problem().unwrap().contains("without an instruction"));
    }

    #[test]
    fn action_flags_parse_or_say_the_form() {
        let (g, a) = parse_action_flag("2:script:./check-db.sh --x:y").unwrap();
        assert_eq!(
            (g, a.kind, a.command.as_str()),
            (1, ActionKind::Script, "./check-db.sh --x:y")
        );
        let (g, a) = parse_action_flag("1:manual:check the DB replica").unwrap();
        assert_eq!((g, a.kind), (0, ActionKind::Manual));
        for bad in ["0:script:x", "x:script:y", "1:script", "1:shell:x"] {
            assert!(parse_action_flag(bad).is_err(), "{bad}");
        }
        assert!(
            parse_action_flag("1:shell:x")
                .unwrap_err()
                .contains("script, manual")
        );
    }

    #[test]
    fn plans_round_trip_through_the_wire() {
        let mut p = plan(&[&["db1"], &["web1", "web2"]]);
        p.groups[1].before.push(Action {
            name: "db up".into(),
            kind: ActionKind::Script,
            command: "./check.sh".into(),
        });
        let wire = pb::RecoveryPlan::from(&p);
        assert_eq!(Plan::try_from(&wire).unwrap(), p);
        let mut bad = wire.clone();
        bad.groups[1].before[0].kind = "shell".into();
        assert!(Plan::try_from(&bad).unwrap_err().contains("shell"));
    }
}
