//! What a trainer writes into a resumable checkpoint ([`crate::io::checkpoint`]) and reads back:
//! module and optimiser records as bytes (Burn's `BinBytesRecorder` at full precision, which
//! keeps every parameter's id, so the optimiser's moments and the EMA find their parameters
//! again), and the position of every random stream.

use burn::module::Module;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Record, Recorder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::Backend;

/// A trainer's resumable state: named files and its counters as JSON.
#[derive(Default)]
pub struct TrainerState {
    pub files: Vec<(String, Vec<u8>)>,
    pub state: serde_json::Map<String, serde_json::Value>,
}

impl TrainerState {
    /// Adds a record (a module's or an optimiser's) as file `name`.
    pub fn record<B: Backend, R: Record<B>>(&mut self, name: &str, record: R) -> Result<(), String> {
        let bytes = BinBytesRecorder::<FullPrecisionSettings>::default()
            .record(record, ())
            .map_err(|e| format!("checkpoint `{name}`: {e}"))?;
        self.files.push((name.to_string(), bytes));
        Ok(())
    }

    /// Adds a module's weights as file `name`.
    pub fn module<B: Backend, M: Module<B>>(&mut self, name: &str, module: &M) -> Result<(), String> {
        self.record::<B, _>(name, module.clone().into_record())
    }

    /// Adds a counter or stream position under `key`.
    pub fn set(&mut self, key: &str, value: impl Serialize) {
        self.state.insert(key.to_string(), serde_json::to_value(value).expect("state serialises"));
    }
}

/// A checkpoint as a trainer reads it back.
pub struct SavedState<'a> {
    pub checkpoint: &'a crate::io::checkpoint::Checkpoint,
}

impl SavedState<'_> {
    /// Record `name`, loaded onto `device`.
    pub fn record<B: Backend, R: Record<B>>(&self, name: &str, device: &B::Device) -> Result<R, String> {
        let bytes = self.checkpoint.file(name)?.to_vec();
        BinBytesRecorder::<FullPrecisionSettings>::default()
            .load(bytes, device)
            .map_err(|e| format!("{}: `{name}`: {e}", self.checkpoint.path.display()))
    }

    /// `module` with the weights (and parameter ids) of file `name`.
    pub fn module<B: Backend, M: Module<B>>(&self, name: &str, module: M, device: &B::Device) -> Result<M, String> {
        Ok(module.load_record(self.record::<B, M::Record>(name, device)?))
    }

    /// Counter or stream position `key`.
    pub fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T, String> {
        let value = self.checkpoint.manifest.state.get(key).cloned().ok_or_else(|| format!("{}: no `{key}` in its state", self.checkpoint.path.display()))?;
        serde_json::from_value(value).map_err(|e| format!("{}: `{key}`: {e}", self.checkpoint.path.display()))
    }
}

/// The exact position of a ChaCha stream: its seed, stream number and word position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: String,
    pub stream: u64,
    /// A `u128`, as text (JSON numbers stop at 64 bits).
    pub word_pos: String,
}

impl RngState {
    pub fn of(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// The generator at this position.
    pub fn rng(&self) -> Result<ChaCha8Rng, String> {
        let bad = || format!("random stream state {self:?} is malformed");
        if self.seed.len() != 64 {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (i, byte) in seed.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse().map_err(|_| bad())?);
        Ok(rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn a_stream_continues_where_it_was_saved() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        rng.set_stream(3);
        // An odd number of 32-bit words: the position falls inside a block.
        for _ in 0..5 {
            let _: u32 = rng.random();
        }
        let state = RngState::of(&rng);
        let json = serde_json::to_string(&state).unwrap();
        let mut back = serde_json::from_str::<RngState>(&json).unwrap().rng().unwrap();
        let ahead: Vec<u64> = (0..50).map(|_| rng.random()).collect();
        let again: Vec<u64> = (0..50).map(|_| back.random()).collect();
        assert_eq!(ahead, again);
        assert!(RngState { seed: "zz".into(), stream: 0, word_pos: "0".into() }.rng().is_err());
    }
}
