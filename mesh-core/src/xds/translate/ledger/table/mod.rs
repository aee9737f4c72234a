//! The ledger's table. Each entry lists every field of its message the
//! tests fail when a field is missing or named wrongly. Fields marked `R` are refused.

use super::entry::Entry;

mod cluster;
mod listener;
mod route;
mod terms;
mod tls;

/// Every entry, in the order of the parts above.
pub(super) fn entries() -> &'static [Entry] {
    static ALL: std::sync::OnceLock<Vec<Entry>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| {
        [
            listener::ENTRIES,
            route::ENTRIES,
            cluster::ENTRIES,
            tls::ENTRIES,
        ]
        .concat()
    })
}
