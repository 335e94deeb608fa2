//! Knowledge retrieval: document chunking ([`chunker`]), the FAISS vector store
//! ([`index`]), the protocol-agnostic knowledge service ([`knowledge`]) and the RAG
//! prompt builder ([`rag`]), over the sentence embedder of `genai-models`. See
//! `README.md` beside this crate.
//!
//! Every fallible call returns [`RetrievalError`], whose variants map one to one
//! onto gRPC codes and HTTP statuses in `api::knowledge`.

pub mod chunker;
pub mod config;
#[cfg(feature = "faiss-gpu")]
mod gpu_index;
pub mod index;
pub mod knowledge;
pub mod rag;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

/// Errors of the retrieval stack. `InvalidArgument` always names the field.
#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("embedding model: {0}")]
    Model(String),
    #[error("vector index: {0}")]
    Index(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RetrievalError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<genai_models::EmbedError> for RetrievalError {
    fn from(e: genai_models::EmbedError) -> Self {
        use genai_models::EmbedError as E;
        match e {
            E::InvalidArgument { field, message } => Self::InvalidArgument { field, message },
            E::Overloaded(m) => Self::Overloaded(m),
            E::Unavailable(m) => Self::Unavailable(m),
            E::Model(m) => Self::Model(m),
        }
    }
}
