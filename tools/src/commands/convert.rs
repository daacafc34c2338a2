//! `densepred convert`: checkpoint format conversion.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Convert {
    /// Convert a PyTorch checkpoint (`torch.save` zip; state dict under `model`, `state_dict` or at
    /// the top level) to safetensors, keeping every tensor name as it is.
    Pth2safetensors {
        /// Input `.pth` file.
        input: PathBuf,
        /// Output `.safetensors` file (written atomically).
        output: PathBuf,
    },
}

pub fn run(c: Convert) -> Result<()> {
    match c {
        Convert::Pth2safetensors { input, output } => {
            let tensors = densepred_core::weights::read_checkpoint(&input)?;
            let n: usize = tensors.values().map(|t| t.elem_count()).sum();
            densepred_core::weights::save_safetensors_atomic(&tensors, &output)?;
            println!(
                "wrote {} tensors ({n} values) to {}",
                tensors.len(),
                output.display()
            );
            Ok(())
        }
    }
}
