//! `ferry disk ...` and `ferry hrl ...`: inspect, map and convert disk images, dump change logs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ferry::outln;
use ferry_disk::hrl::HrlLog;
use ferry_disk::{
    BlockDevice, CreateOptions, DiskWriter, ExtentKind, Format, OpenOptions, Subformat,
    VhdxCreateOptions, copy_into, create, create_vhdx, open_with,
};

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// Human-readable table.
    #[default]
    Table,
    Json,
}

#[derive(clap::Subcommand, Debug)]
pub enum DiskCmd {
    /// Format, subformat, sizes, sector sizes and parent of a disk image.
    Info {
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Parent image to use instead of the parent locators.
        #[arg(long)]
        parent: Option<PathBuf>,
    },
    /// Allocation map: allocated, zero and absent (parent or zeros) extents.
    Map {
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
        #[arg(long)]
        parent: Option<PathBuf>,
    },
    /// Converts an image (with its whole parent chain) into a new file.
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Output format: raw, vhd or vhdx.
        #[arg(long, short = 'f')]
        format: Format,
        /// dynamic (default) or fixed; ignored for raw, which is always sparse.
        #[arg(long)]
        subformat: Option<Subformat>,
        /// Block size in bytes for dynamic output.
        #[arg(long)]
        block_size: Option<u32>,
        #[arg(long)]
        parent: Option<PathBuf>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum HrlCmd {
    /// Header and write records of a Hyper-V Replica Log (.hrl).
    Dump {
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

fn open_disk(file: &Path, parent: Option<PathBuf>) -> Result<Box<dyn BlockDevice>> {
    open_with(
        file,
        &OpenOptions {
            format: None,
            parent,
        },
    )
    .with_context(|| format!("opening {}", file.display()))
}

pub fn run_disk(cmd: DiskCmd) -> Result<()> {
    match cmd {
        DiskCmd::Info {
            file,
            output,
            parent,
        } => {
            let d = open_disk(&file, parent)?;
            let info = d.info();
            match output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&info)?),
                Output::Table => {
                    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                    let rows = [
                        ("format", info.format.clone()),
                        ("subformat", opt(info.subformat.clone())),
                        (
                            "virtual_size",
                            format!("{} ({})", info.virtual_size, human(info.virtual_size)),
                        ),
                        ("block_size", opt(info.block_size.map(|b| b.to_string()))),
                        ("logical_sector_size", info.logical_sector_size.to_string()),
                        (
                            "physical_sector_size",
                            info.physical_sector_size.to_string(),
                        ),
                        (
                            "allocated_bytes",
                            format!("{} ({})", info.allocated_bytes, human(info.allocated_bytes)),
                        ),
                        ("parent", opt(info.parent.clone())),
                    ];
                    for (k, v) in rows {
                        outln!("{k:<22} {v}");
                    }
                }
            }
        }
        DiskCmd::Map {
            file,
            output,
            parent,
        } => {
            let d = open_disk(&file, parent)?;
            let ext = d
                .extents()
                .with_context(|| format!("mapping {}", file.display()))?;
            match output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&ext)?),
                Output::Table => {
                    outln!("{:>18} {:>18} {:>12}  kind", "offset", "length", "");
                    for e in &ext {
                        let kind = match e.kind {
                            ExtentKind::Allocated => "allocated",
                            ExtentKind::Zero => "zero",
                            ExtentKind::Absent => "absent",
                        };
                        outln!(
                            "{:>#18x} {:>#18x} {:>12}  {kind}",
                            e.offset,
                            e.len,
                            human(e.len)
                        );
                    }
                }
            }
        }
        DiskCmd::Convert {
            input,
            output,
            format,
            subformat,
            block_size,
            parent,
        } => {
            let src = open_disk(&input, parent)?;
            let info = src.info();
            // VHD sizes are whole 512-byte sectors, VHDX sizes whole logical sectors (the
            // source's, so a 4096-byte-sector disk stays one); the padding reads as zeros.
            let sector = match format {
                Format::Raw => 1,
                Format::Vhd => 512,
                Format::Vhdx => u64::from(info.logical_sector_size.max(512)),
            };
            let size = src.virtual_size().div_ceil(sector) * sector;
            let sub = match (format, subformat) {
                (Format::Raw, _) => Subformat::Fixed,
                (_, Some(Subformat::Differencing)) => {
                    bail!("convert makes fixed or dynamic images")
                }
                (_, Some(s)) => s,
                (_, None) => Subformat::Dynamic,
            };
            let started = Instant::now();
            let mut w: Box<dyn DiskWriter> = if format == Format::Vhdx {
                create_vhdx(
                    &output,
                    &VhdxCreateOptions {
                        virtual_size: size,
                        fixed: sub == Subformat::Fixed,
                        block_size,
                        logical_sector_size: info.logical_sector_size,
                        physical_sector_size: info.physical_sector_size.max(512),
                        parent: None,
                    },
                )
                .with_context(|| format!("creating {}", output.display()))?
            } else {
                create(
                    &output,
                    format,
                    &CreateOptions {
                        virtual_size: size,
                        subformat: sub,
                        block_size,
                    },
                )
                .with_context(|| format!("creating {}", output.display()))?
            };
            let stats = copy_into(src.as_ref(), w.as_mut()).with_context(|| {
                format!("copying {} into {}", input.display(), output.display())
            })?;
            w.finish()
                .with_context(|| format!("closing {}", output.display()))?;
            outln!(
                "converted {} -> {} ({format}, {} virtual): read {}, wrote {} in {:.2?}",
                input.display(),
                output.display(),
                human(size),
                human(stats.read),
                human(stats.written),
                started.elapsed()
            );
        }
    }
    Ok(())
}

pub fn run_hrl(cmd: HrlCmd) -> Result<()> {
    match cmd {
        HrlCmd::Dump { file, output } => {
            let log = HrlLog::open(&file).with_context(|| format!("reading {}", file.display()))?;
            match output {
                Output::Json => {
                    let v = serde_json::json!({
                        "header": log.header,
                        "clean": log.clean,
                        "valid_end": log.valid_end,
                        "metadata_blocks": log.metadata_blocks,
                        "records": log.records,
                    });
                    outln!("{}", serde_json::to_string_pretty(&v)?);
                }
                Output::Table => {
                    let h = &log.header;
                    let rows = [
                        ("unique_id", h.unique_id.to_string()),
                        ("previous_unique_id", h.previous_unique_id.to_string()),
                        ("vhd2_data_write_guid", h.vhd2_data_write_guid.to_string()),
                        ("version", format!("{:#x}", h.version)),
                        ("creator", h.creator_app.clone()),
                        ("metadata_size", h.metadata_size.to_string()),
                        ("eol_location", h.eol.to_string()),
                        ("closed_cleanly", log.clean.to_string()),
                        ("valid_end", log.valid_end.to_string()),
                        ("metadata_blocks", log.metadata_blocks.to_string()),
                        ("records", log.records.len().to_string()),
                    ];
                    for (k, v) in rows {
                        outln!("{k:<22} {v}");
                    }
                    outln!();
                    outln!(
                        "{:>8} {:>18} {:>10} {:>14} {:>12}",
                        "#",
                        "disk offset",
                        "length",
                        "file offset",
                        "timestamp"
                    );
                    for (i, r) in log.records.iter().enumerate() {
                        outln!(
                            "{i:>8} {:>#18x} {:>10} {:>#14x} {:>12}",
                            r.offset,
                            r.length,
                            r.data_at,
                            r.timestamp
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
