//! What the user gives the client besides its flags: the password (typed without echo, or
//! piped), the token (flag, environment or the token file `login` writes) and the lines of
//! stdin that `send` sends.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::ClientArgs;

/// The password: `$CHATOY_PASSWORD`, else, on a terminal, typed at a prompt without echo, else
/// the first line of stdin (for scripts).
pub(super) fn password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("CHATOY_PASSWORD") {
        return Ok(password);
    }
    let line = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("Password: ").context("cannot read the password")?
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        line
    };
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        bail!("no password: set CHATOY_PASSWORD or give it on stdin");
    }
    Ok(password)
}

pub(super) fn token_path(args: &ClientArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.token_file {
        return Ok(path.clone());
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".config")))
        .context("neither XDG_CONFIG_HOME nor HOME is set: give --token-file")?;
    Ok(config.join("chatoy").join("token"))
}

/// Writes the token readable by its owner only.
pub(super) fn save_token(path: &Path, token: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{token}").with_context(|| format!("cannot write {}", path.display()))
}

pub(super) fn token(args: &ClientArgs) -> anyhow::Result<String> {
    if let Some(token) = args.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(token.to_owned());
    }
    let path = token_path(args)?;
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Ok(_) => bail!("{} is empty: run `chatoy client login NAME`", path.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            bail!("not logged in: run `chatoy client login NAME` or set CHATOY_TOKEN")
        }
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The lines of stdin, empty ones left out: one message each.
pub(super) fn stdin_lines() -> anyhow::Result<Vec<String>> {
    let stdin = std::io::stdin();
    let mut lines = Vec::new();
    for line in stdin.lock().lines() {
        let line = line.context("cannot read stdin")?;
        if !line.is_empty() {
            lines.push(line);
        }
    }
    Ok(lines)
}
