//! How a job is stored in the registry's catalog: field by field, readable JSON with the step
//! statuses by name. Catalogs written before this stored the prost bytes in hex
//! (`{"job_hex": "..."}`); those records are still read, and the next change of each job
//! writes it in the new form (nothing to migrate by hand).
use ferry_proto::common::v1::{Job, JobStep, StepStatus};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JobRecord {
    Fields(StoredJob),
    /// The old form: a prost-encoded `Job`, hex.
    Hex {
        job_hex: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredJob {
    pub id: String,
    pub kind: String,
    pub target: String,
    pub status: Status,
    pub steps: Vec<StoredStep>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_skipped: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cancellable_until_step: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resumed_step: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resume_comment: String,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub params: std::collections::BTreeMap<String, String>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredStep {
    pub name: String,
    pub status: Status,
    #[serde(default)]
    pub progress_percent: u32,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub started_at_ms: i64,
    #[serde(default)]
    pub ended_at_ms: i64,
}

/// A job's or step's status by name.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Unspecified,
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Skipped,
    WaitingForInput,
}

impl From<i32> for Status {
    fn from(v: i32) -> Self {
        match StepStatus::try_from(v) {
            Ok(StepStatus::Pending) => Self::Pending,
            Ok(StepStatus::Running) => Self::Running,
            Ok(StepStatus::Succeeded) => Self::Succeeded,
            Ok(StepStatus::Failed) => Self::Failed,
            Ok(StepStatus::Cancelled) => Self::Cancelled,
            Ok(StepStatus::Skipped) => Self::Skipped,
            Ok(StepStatus::WaitingForInput) => Self::WaitingForInput,
            Ok(StepStatus::Unspecified) | Err(_) => Self::Unspecified,
        }
    }
}

impl From<Status> for i32 {
    fn from(s: Status) -> Self {
        (match s {
            Status::Unspecified => StepStatus::Unspecified,
            Status::Pending => StepStatus::Pending,
            Status::Running => StepStatus::Running,
            Status::Succeeded => StepStatus::Succeeded,
            Status::Failed => StepStatus::Failed,
            Status::Cancelled => StepStatus::Cancelled,
            Status::Skipped => StepStatus::Skipped,
            Status::WaitingForInput => StepStatus::WaitingForInput,
        }) as i32
    }
}

impl From<&JobStep> for StoredStep {
    fn from(s: &JobStep) -> Self {
        Self {
            name: s.name.clone(),
            status: s.status.into(),
            progress_percent: s.progress_percent,
            message: s.message.clone(),
            started_at_ms: s.started_at_ms,
            ended_at_ms: s.ended_at_ms,
        }
    }
}

impl From<&StoredStep> for JobStep {
    fn from(s: &StoredStep) -> Self {
        Self {
            name: s.name.clone(),
            status: s.status.into(),
            progress_percent: s.progress_percent,
            message: s.message.clone(),
            started_at_ms: s.started_at_ms,
            ended_at_ms: s.ended_at_ms,
        }
    }
}

impl JobRecord {
    pub fn encode(job: &Job) -> Self {
        Self::Fields(StoredJob {
            id: job.id.clone(),
            kind: job.kind.clone(),
            target: job.target.clone(),
            status: job.status.into(),
            steps: job.steps.iter().map(StoredStep::from).collect(),
            created_at_ms: job.created_at_ms,
            updated_at_ms: job.updated_at_ms,
            error: job.error.clone(),
            bytes_total: job.bytes_total,
            bytes_done: job.bytes_done,
            bytes_skipped: job.bytes_skipped,
            cancellable_until_step: job.cancellable_until_step,
            cancel_requested: job.cancel_requested,
            resumed_step: job.resumed_step,
            resume_comment: job.resume_comment.clone(),
            params: job.params.clone().into_iter().collect(),
        })
    }

    /// The job; `None` for an old hex record that does not decode.
    pub fn decode(&self) -> Option<Job> {
        match self {
            Self::Fields(j) => Some(j.to_job()),
            Self::Hex { job_hex } => {
                use prost::Message;
                let bytes = hex::decode(job_hex).ok()?;
                Job::decode(bytes.as_slice()).ok()
            }
        }
    }
}

impl StoredJob {
    fn to_job(&self) -> Job {
        Job {
            id: self.id.clone(),
            kind: self.kind.clone(),
            target: self.target.clone(),
            status: self.status.into(),
            steps: self.steps.iter().map(JobStep::from).collect(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            error: self.error.clone(),
            bytes_total: self.bytes_total,
            bytes_done: self.bytes_done,
            bytes_skipped: self.bytes_skipped,
            cancellable_until_step: self.cancellable_until_step,
            cancel_requested: self.cancel_requested,
            resumed_step: self.resumed_step,
            resume_comment: self.resume_comment.clone(),
            params: self.params.clone().into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Event;

    fn job() -> Job {
        Job {
            id: "j1".into(),
            kind: "resync".into(),
            target: "web01".into(),
            status: StepStatus::Running as i32,
            steps: vec![JobStep {
                name: "resync".into(),
                status: StepStatus::Succeeded as i32,
                progress_percent: 100,
                message: "done".into(),
                started_at_ms: 5,
                ended_at_ms: 6,
            }],
            created_at_ms: 1,
            updated_at_ms: 2,
            error: String::new(),
            bytes_total: 10,
            bytes_done: 7,
            bytes_skipped: 3,
            cancellable_until_step: 1,
            cancel_requested: true,
            resumed_step: 1,
            resume_comment: "checked".into(),
            params: [("mode".to_owned(), "planned".to_owned())]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn jobs_are_stored_as_readable_fields_and_read_back_whole() {
        let text = serde_json::to_string(&Event::Job(JobRecord::encode(&job()))).unwrap();
        assert!(text.contains(r#""event":"job""#), "{text}");
        assert!(text.contains(r#""status":"running""#), "{text}");
        assert!(!text.contains("job_hex"), "{text}");
        let Event::Job(back) = serde_json::from_str(&text).unwrap() else {
            panic!("not a job event: {text}");
        };
        assert_eq!(back.decode(), Some(job()));
    }

    #[test]
    fn old_hex_records_are_still_read() {
        use prost::Message;
        let old = format!(
            r#"{{"event":"job","job_hex":"{}"}}"#,
            hex::encode(job().encode_to_vec())
        );
        let Event::Job(rec) = serde_json::from_str(&old).unwrap() else {
            panic!("not a job event");
        };
        assert!(matches!(rec, JobRecord::Hex { .. }));
        assert_eq!(rec.decode(), Some(job()));
    }
}
