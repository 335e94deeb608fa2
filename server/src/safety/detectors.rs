//! `genai_safety`'s injection and toxicity detectors behind the chain's [`Detector`] seam.
//!
//! Injection: the rules run inline (microseconds); the classifier embeds the text's chunks on
//! the embedder's interactive queue, which the chain does while the engine prefills. Toxicity:
//! lexicon and TF-IDF + SVM are plain CPU work under a millisecond for a 1k-token prompt, so
//! they run inline. An embedder that cannot answer (queue full, stopped) leaves the rules'
//! verdict standing and says so in a warning: availability over a classifier opinion.
//!
//! Tested through the chain in `tests/e2e/safety.rs` (a jailbreak refused, a benign prompt
//! answered) and by the detectors' own tests in `genai-safety`.

use std::path::Path;

use genai_models::embedder::{EmbedderHandle, Priority};
use genai_safety::injection::{InjectionConfig, InjectionDetector};
use genai_safety::toxicity::{ToxicityConfig, ToxicityDetector};
use genai_safety::{Stage, Verdict};

use super::Detector;

pub(crate) struct Injection {
    detector: InjectionDetector,
    embedder: EmbedderHandle,
}

impl Injection {
    /// The rules and classifier fetched into `models_dir` by `scripts/fetch-models.sh`.
    pub(crate) fn load(models_dir: &Path, embedder: EmbedderHandle) -> anyhow::Result<Self> {
        let detector = InjectionDetector::new(&InjectionConfig::with_models_dir(models_dir))
            .map_err(|e| anyhow::anyhow!("injection stage: {e} (run scripts/fetch-models.sh)"))?;
        Ok(Self { detector, embedder })
    }
}

#[async_trait::async_trait]
impl Detector for Injection {
    fn stage(&self) -> Stage {
        Stage::Injection
    }

    fn check(&self, text: &str, _threshold: Option<f32>) -> Verdict {
        self.detector.rules(text).unwrap_or(Verdict::allow(Stage::Injection))
    }

    /// The classifier over the text's chunks (the highest chunk decides); the chain has run the
    /// rules (`check`) first.
    async fn classify(&self, text: &str, threshold: Option<f32>) -> Option<Verdict> {
        let chunks: Vec<String> = self
            .detector
            .classifier_chunks(text)
            .into_iter()
            .map(str::to_owned)
            .collect();
        if chunks.is_empty() {
            return None;
        }
        match self.embedder.embed(chunks, Priority::Interactive).await {
            Ok(e) => Some(self.detector.classify_chunks_at(
                e.vectors.iter().map(Vec::as_slice),
                threshold.unwrap_or(self.detector.threshold()),
            )),
            Err(e) => {
                tracing::warn!(target: "genai::safety", error = %e, "injection classifier skipped: the embedder did not answer");
                None
            }
        }
    }
}

pub(crate) struct Toxicity(ToxicityDetector);

impl Toxicity {
    pub(crate) fn load(models_dir: &Path) -> anyhow::Result<Self> {
        let detector = ToxicityDetector::new(&ToxicityConfig::with_models_dir(models_dir))
            .map_err(|e| anyhow::anyhow!("toxicity stage: {e} (run scripts/fetch-models.sh)"))?;
        Ok(Self(detector))
    }
}

#[async_trait::async_trait]
impl Detector for Toxicity {
    fn stage(&self) -> Stage {
        Stage::Toxicity
    }

    fn check(&self, text: &str, threshold: Option<f32>) -> Verdict {
        self.0.check_at(text, threshold.unwrap_or(self.0.threshold()))
    }
}
