//! The `genai.v1` protocol: messages, tonic clients and servers, and the
//! encoded file descriptor set that server reflection publishes.

pub mod v1 {
    tonic::include_proto!("genai.v1");

    /// Encoded `FileDescriptorSet` of every `genai.v1` file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("genai_v1_descriptor");
}
