//! The field ledger: what the mesh does with every field of every xDS message it reads.
//!
//! Each field of each message the translator reads is classified as
//! - [`Treatment::Honoured`]: acted on (a value the mesh cannot act on is refused by the
//!   translator, naming the field);
//! - [`Treatment::Refused`]: a resource that sets it is NACKed, naming the field path;
//! - [`Treatment::Ignored`]: not acted on, for a stated reason; only fields that cannot change
//!   how a request is handled or who may make it (statistics names, access logs, socket tuning).
//!
//! The ledger is not documentation only: after a resource translates, `check` walks every
//! field that is set in it (through `Any` by its type URL, through lists and maps) and refuses
//! the resource if a set field is refused or, for a field added by a newer envoy-types release,
//! not classified at all. So a resource is accepted with every behaviour-changing field
//! honoured, or refused naming the field; never anything in between. The tests check the
//! ledger against the proto descriptors (every field of every reachable message classified) and
//! against a corpus of real control planes' output; `docs/xds-field-ledger.md` renders it.
//!
//! Messages met inside an `Any` whose type the ledger does not list are the translator's to
//! refuse: it dispatches on the type URL and refuses every type it does not implement (an HTTP
//! filter or per-route filter config marked optional is skipped whole, as in Envoy).

use std::collections::HashMap;
use std::sync::OnceLock;

use prost::{Message, Name};

use super::{err, FieldError};

mod table;

mod entry;
mod wire;

#[cfg(test)]
pub(crate) mod reference;

pub use entry::{Entry, Treatment};

/// Every entry of the ledger.
pub fn entries() -> &'static [Entry] {
    table::entries()
}

/// The entry for a key (a message's full name or an alias).
pub fn entry(key: &str) -> Option<&'static Entry> {
    static INDEX: OnceLock<HashMap<&'static str, &'static Entry>> = OnceLock::new();
    INDEX
        .get_or_init(|| entries().iter().map(|e| (e.key, e)).collect())
        .get(key)
        .copied()
}

/// The four resource kinds whose translation the ledger guards.
pub const ROOTS: [&str; 4] = [
    "envoy.config.listener.v3.Listener",
    "envoy.config.route.v3.RouteConfiguration",
    "envoy.config.cluster.v3.Cluster",
    "envoy.config.endpoint.v3.ClusterLoadAssignment",
];

/// Checks every set field of a resource against the ledger.
pub(crate) fn check_resource<M: Message + Name>(resource: &M) -> Result<(), FieldError> {
    // The root's name without formatting one (`Name::full_name` allocates).
    let root = ROOTS
        .iter()
        .find(|r| r.strip_prefix(M::PACKAGE).and_then(|n| n.strip_prefix('.')) == Some(M::NAME));
    let Some(root) = root else {
        return err(format!("no ledger root for {}", M::full_name()));
    };
    // The typed message re-encoded holds exactly the fields it has set (defaults of fields
    // without presence are not written, unknown fields were dropped when it was decoded).
    wire::check(&resource.encode_to_vec(), root)
}

/// Renders the ledger as a Markdown table (what `docs/xds-field-ledger.md` holds).
pub fn render_markdown() -> String {
    let mut out = String::from(
        "# xDS field ledger\n\n\
         Generated from `mesh-core/src/xds/translate/ledger/table.rs` (the test \
         `ledger_doc_is_current` fails when this file is stale; `MESH_BLESS=1 cargo test -p mesh-xds ledger` rewrites it).\n\n\
         Every field of every xDS message the mesh reads, and what the mesh does with it:\n\
         **honoured** (acted on; a value the mesh cannot act on is refused by the translator, naming the field), \
         **refused** (a resource that sets it is NACKed, naming the field path), or **ignored** for the reason given \
         (only fields that cannot change how a request is handled or who may make it).\n\
         After translation every set field of a resource is checked against this table, so a field \
         the table does not list (a newer envoy-types release) is refused, not ignored.\n\
         Types reached through `Any` that are not listed here (HTTP filters, per-route configs, \
         load-balancing policies and so on) are refused by the translator, except optional filters, which are skipped.\n",
    );
    for e in entries() {
        out.push_str(&format!("\n## `{}`", e.message));
        if e.key != e.message {
            out.push_str(&format!(" (as `{}`)", e.key));
        }
        out.push_str("\n\n| field | treatment |\n|---|---|\n");
        for (name, t) in e.fields {
            let t = match t {
                Treatment::Honoured => "honoured".to_owned(),
                Treatment::HonouredAs(alias) => format!("honoured (see `{alias}`)"),
                Treatment::Refused => "**refused**".to_owned(),
                Treatment::Ignored(why) => format!("ignored: {why}"),
            };
            out.push_str(&format!("| `{name}` | {t} |\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
