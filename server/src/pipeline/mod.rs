//! The protocol-neutral request pipeline between the two doors and the backends.

pub(crate) mod context;
