//! What the ledger says of a message: each field honoured, honoured in another form, ignored
//! (with why it changes no request), or refused.

/// What the mesh does with one field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Treatment {
    /// Acted on.
    Honoured,
    /// Acted on, read as the ledger entry of this name (for messages whose fields are treated
    /// differently in different places, e.g. `HttpProtocolOptions` on a listener and on a
    /// cluster).
    HonouredAs(&'static str),
    /// A resource that sets it is refused.
    Refused,
    /// Not acted on, for this reason.
    Ignored(&'static str),
}

/// The ledger entry of one message (or of one message in one place, see
/// [`Treatment::HonouredAs`]).
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// The entry's key: the message's full name, or a name for the message in one place.
    pub key: &'static str,
    /// The message's full name.
    pub message: &'static str,
    /// Every field of the message, in declaration order.
    pub fields: &'static [(&'static str, Treatment)],
}

impl Entry {
    /// The treatment of a field, if the entry lists it.
    pub fn field(&self, name: &str) -> Option<Treatment> {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
    }
}
