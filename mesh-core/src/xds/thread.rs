//! The xDS client's own thread: a single-threaded runtime that runs its task apart from the
//! service's workers (see `XdsClientBuilder::on_caller_runtime`).

use std::future::Future;

use crate::error::XdsError;

/// Runs `task` to completion on a new thread called `name`, with a runtime of its own. The
/// caller's tracing subscriber, if it set one for its thread only, follows the task.
pub(super) fn spawn(
    name: &str,
    task: impl Future<Output = ()> + Send + 'static,
) -> Result<(), XdsError> {
    let failed = |reason: String| XdsError::Thread { reason };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || tracing::dispatcher::with_default(&dispatch, || rt.block_on(task)))
        .map_err(|e| failed(e.to_string()))?;
    Ok(())
}
