//! Devices named as the CLI's `--device` and Python's `device=` take them.

use crate::runner::EngineError;
use candle_core::Device;

/// Parses `cpu`, `cuda` or `cuda:N` (case and surrounding spaces ignored) and opens the device.
///
/// Errors: [`EngineError::Config`] for another spelling, or for a CUDA device that does not open
/// (no GPU, or a build without the `cuda` feature); the message names what was asked for.
pub fn parse_device(s: &str) -> Result<Device, EngineError> {
    let name = s.trim().to_ascii_lowercase();
    let ordinal = match name.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                EngineError::Config(format!("device must be cpu, cuda or cuda:N, got {s:?}"))
            })?,
    };
    Device::new_cuda(ordinal).map_err(|e| {
        EngineError::Config(format!(
            "device {s:?}: CUDA device {ordinal} did not open (a build with the `cuda` feature on \
             a GPU machine is needed): {e}"
        ))
    })
}

/// The device of a run: `flag` (the CLI's `--device`, Python's `device=`) if given, else the
/// config's `device` key, else the CPU.
///
/// Errors: as [`parse_device`].
pub fn resolve_device(
    flag: Option<&str>,
    cfg: &crate::runner::RunConfig,
) -> Result<Device, EngineError> {
    parse_device(flag.or(cfg.device.as_deref()).unwrap_or("cpu"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_errors() {
        assert!(matches!(parse_device(" CPU ").unwrap(), Device::Cpu));
        let e = parse_device("gpu0").unwrap_err().to_string();
        assert!(
            e.contains("cpu, cuda or cuda:N") && e.contains("gpu0"),
            "{e}"
        );
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:x"), "{e}");
        // No machine has this GPU (and CPU-only builds have none at all).
        let e = parse_device("cuda:4096").unwrap_err().to_string();
        assert!(e.contains("CUDA device 4096 did not open"), "{e}");
    }
}
