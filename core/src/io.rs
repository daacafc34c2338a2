//! Writing outputs so that an interrupted run never leaves a truncated file behind.

use std::path::Path;

/// Writes `path` atomically: `write` fills a temporary file in the same folder (named
/// `.tmp<pid>.<file name>`, so it keeps the extension that format-sniffing writers look at),
/// which is then renamed over `path`. Missing parent folders are created; on failure the
/// temporary file is removed.
///
/// Errors: a path without a file name, a folder that cannot be created, `write`'s own error, or a
/// failed rename; each message names the file.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{}: not a file path", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating folder {}: {e}", dir.display()))?;
    }
    let tmp = path.with_file_name(format!(".tmp{}.{name}", std::process::id()));
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("writing {}: {e}", tmp.display()));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}: {e}", tmp.display(), path.display())
    })
}
