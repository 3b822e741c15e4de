//! The crew daemon (being written on this branch).

use std::path::PathBuf;

use clap::Args;

use crate::Failure;

/// `crew daemon`: runs the controller of a project folder in the foreground
/// and serves docs/api.md on `DIR/crew.sock`. Started by `crew up` (and by
/// any command that needs the daemon), detached; not usually run by hand.
#[derive(Args, Debug)]
pub(crate) struct DaemonArgs {
    /// The project folder (absolute), e.g. /home/me/work/.crew
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: PathBuf,
}

pub(crate) fn main(_args: DaemonArgs) -> Result<u8, Failure> {
    Err(Failure::internal(anyhow::anyhow!("the daemon is being written")))
}
