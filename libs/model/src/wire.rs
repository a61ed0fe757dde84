//! The one conversion between the model's enums and the protobuf enums: `pb::X::from(model)`
//! and `i32::from(model)` to build a message, `Model::try_from(i32)` to read one, refusing
//! an unspecified or unknown value with an error that names the field's type.
use ferry_proto::common::v1 as common;
use ferry_proto::registry::v1 as registry;

use crate::{
    Consistency, CycleKind, DiskSpec, ErrorClass, Health, TestFailover, VmHardware, VmState,
};

/// A protobuf enum value the model has no variant for (unspecified, or from a newer peer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} is unspecified or unknown (value {value})")]
pub struct UnknownValue {
    pub kind: &'static str,
    pub value: i32,
}

macro_rules! wire_enum {
    ($model:ident <=> $pb:ty { $($m:ident <=> $p:ident),+ $(,)? }) => {
        impl From<$model> for $pb {
            fn from(v: $model) -> Self {
                match v { $($model::$m => <$pb>::$p),+ }
            }
        }

        impl From<$model> for i32 {
            fn from(v: $model) -> Self {
                <$pb>::from(v) as i32
            }
        }

        impl $model {
            /// The kebab-case name of a wire value (what the CLI's JSON prints), or
            /// "unspecified" / "unknown".
            pub fn wire_name(value: i32) -> &'static str {
                match Self::try_from(value) {
                    Ok(v) => v.as_str(),
                    Err(_) if value == 0 => "unspecified",
                    Err(_) => "unknown",
                }
            }
        }

        impl TryFrom<i32> for $model {
            type Error = UnknownValue;

            fn try_from(value: i32) -> Result<Self, UnknownValue> {
                match <$pb>::try_from(value) {
                    $(Ok(<$pb>::$p) => Ok($model::$m),)+
                    _ => Err(UnknownValue { kind: stringify!($model), value }),
                }
            }
        }
    };
}

wire_enum!(VmState <=> registry::VmState {
    Unprotected <=> Unprotected,
    Enabling <=> Enabling,
    InitialReplication <=> InitialReplication,
    Protected <=> Protected,
    ResyncPending <=> ResyncPending,
    Resyncing <=> Resyncing,
    FailingOver <=> FailingOver,
    FailedOver <=> FailedOver,
    FailoverCommitted <=> FailoverCommitted,
    Reprotecting <=> Reprotecting,
    FailingBack <=> FailingBack,
    Unprotecting <=> Unprotecting,
    Error <=> Error,
});

wire_enum!(Health <=> registry::Health {
    Normal <=> Normal,
    Warning <=> Warning,
    Critical <=> Critical,
});

wire_enum!(TestFailover <=> registry::FailoverState {
    None <=> None,
    Active <=> Test,
});

wire_enum!(CycleKind <=> common::CycleKind {
    Initial <=> Initial,
    Delta <=> Delta,
    Resync <=> Resync,
});

wire_enum!(Consistency <=> common::Consistency {
    Crash <=> Crash,
    App <=> App,
});

wire_enum!(ErrorClass <=> common::ErrorClass {
    Recoverable <=> Recoverable,
    Permanent <=> Permanent,
    ResyncRequired <=> ResyncRequired,
});

impl From<&common::Disk> for DiskSpec {
    fn from(d: &common::Disk) -> Self {
        Self {
            id: d.id.clone(),
            path: d.path.clone(),
            format: d.format.clone(),
            subformat: d.subformat.clone(),
            virtual_size: d.virtual_size,
            logical_sector_size: d.logical_sector_size,
            allocated_bytes: d.allocated_bytes,
            error: d.error.clone(),
            nbd_uri: d.nbd_uri.clone(),
        }
    }
}

/// The wire's `pending_log_bytes` is not part of the spec (it changes every heartbeat): the
/// registry fills it in from memory.
impl From<&DiskSpec> for common::Disk {
    fn from(d: &DiskSpec) -> Self {
        Self {
            id: d.id.clone(),
            path: d.path.clone(),
            format: d.format.clone(),
            subformat: d.subformat.clone(),
            virtual_size: d.virtual_size,
            logical_sector_size: d.logical_sector_size,
            allocated_bytes: d.allocated_bytes,
            error: d.error.clone(),
            nbd_uri: d.nbd_uri.clone(),
            pending_log_bytes: 0,
        }
    }
}

impl From<&common::VmHardware> for VmHardware {
    fn from(h: &common::VmHardware) -> Self {
        Self {
            cpus: h.cpus,
            memory_mib: h.memory_mib,
            networks: h.networks.clone(),
        }
    }
}

impl From<&VmHardware> for common::VmHardware {
    fn from(h: &VmHardware) -> Self {
        Self {
            cpus: h.cpus,
            memory_mib: h.memory_mib,
            networks: h.networks.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T>(all: &[T])
    where
        T: Copy + PartialEq + std::fmt::Debug + TryFrom<i32, Error = UnknownValue>,
        i32: From<T>,
    {
        for v in all {
            assert_eq!(T::try_from(i32::from(*v)), Ok(*v));
        }
    }

    #[test]
    fn every_variant_survives_the_wire() {
        round_trip(VmState::ALL);
        round_trip(Health::ALL);
        round_trip(TestFailover::ALL);
        round_trip(CycleKind::ALL);
        round_trip(Consistency::ALL);
        round_trip(ErrorClass::ALL);
    }

    #[test]
    fn unspecified_is_refused_by_name() {
        assert_eq!(
            VmState::wire_name(VmState::ResyncPending.into()),
            "resync-pending"
        );
        assert_eq!(Health::wire_name(0), "unspecified");
        assert_eq!(Health::wire_name(42), "unknown");
        let e = VmState::try_from(0).unwrap_err();
        assert_eq!(e.kind, "VmState");
        assert!(Health::try_from(99).is_err());
        assert!(ErrorClass::try_from(0).is_err());
    }
}
