//! [`StepPlan`]: the host-side layout of one CUDA step (used by `cuda_runner`; plain data, so it is
//! unit-tested in every build).
//!
//! Validates a [`ForwardBatch`]'s entries the way the CPU runner does (tokens present, ids inside
//! the vocabulary, positions inside the context, block tables covering every position with
//! in-range block ids) and lays the tokens out decode entries first (exactly one new token), then
//! prefill entries, each group in entry order: the decode rows then form one contiguous block for
//! the decode kernel and the rest one block for the prefill kernel. `last_row[i]` maps entry `i`
//! back to the row of its last token, so logits come back in entry order whatever the layout.

use anyhow::bail;

use genai_engine::runner::ForwardBatch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepPlan {
    /// Entry indices in row order: the `num_decode` decode entries first.
    pub(crate) order: Vec<usize>,
    pub(crate) num_decode: usize,
    /// Per row (token): id, position, cache slot.
    pub(crate) tokens: Vec<u32>,
    pub(crate) positions: Vec<u32>,
    pub(crate) slots: Vec<i64>,
    /// Per entry in `order`: context length after this step and number of new tokens.
    pub(crate) context_lens: Vec<usize>,
    pub(crate) query_lens: Vec<usize>,
    /// Per entry (original index): the row of its last token.
    pub(crate) last_row: Vec<usize>,
}

/// Lays out `batch` for a pool of `num_blocks` blocks of `block_size` tokens.
pub(crate) fn plan(
    batch: &ForwardBatch,
    vocab_size: usize,
    context_length: usize,
    num_blocks: usize,
    block_size: usize,
) -> anyhow::Result<StepPlan> {
    let entries = &batch.entries;
    let order: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].tokens.len() == 1)
        .chain((0..entries.len()).filter(|&i| entries[i].tokens.len() != 1))
        .collect();
    let num_decode = entries.iter().filter(|e| e.tokens.len() == 1).count();
    let total: usize = entries.iter().map(|e| e.tokens.len()).sum();
    let mut p = StepPlan {
        order: Vec::new(),
        num_decode,
        tokens: Vec::with_capacity(total),
        positions: Vec::with_capacity(total),
        slots: Vec::with_capacity(total),
        context_lens: Vec::with_capacity(entries.len()),
        query_lens: Vec::with_capacity(entries.len()),
        last_row: vec![0; entries.len()],
    };
    let bs = block_size;
    for &i in &order {
        let e = &entries[i];
        if e.tokens.is_empty() {
            bail!("entry {i} (seq {}): no tokens", e.seq_id);
        }
        let end = e.start_pos + e.tokens.len();
        if end > context_length {
            bail!(
                "entry {i} (seq {}): position {end} beyond context length {context_length}",
                e.seq_id
            );
        }
        if e.block_table.len() < end.div_ceil(bs) {
            bail!(
                "entry {i} (seq {}): block_table has {} blocks for {end} tokens of block size {bs}",
                e.seq_id,
                e.block_table.len()
            );
        }
        if let Some(b) = e.block_table.iter().find(|&&b| b as usize >= num_blocks) {
            bail!("entry {i} (seq {}): block {b} >= {num_blocks} blocks", e.seq_id);
        }
        if let Some(&bad) = e.tokens.iter().find(|&&id| id as usize >= vocab_size) {
            bail!(
                "entry {i} (seq {}): token id {bad} out of vocabulary ({vocab_size})",
                e.seq_id
            );
        }
        for pos in e.start_pos..end {
            p.positions
                .push(u32::try_from(pos).map_err(|_| anyhow::anyhow!("position {pos} exceeds u32"))?);
            p.slots.push((e.block_table[pos / bs] as usize * bs + pos % bs) as i64);
        }
        p.tokens.extend_from_slice(&e.tokens);
        p.last_row[i] = p.tokens.len() - 1;
        p.context_lens.push(end);
        p.query_lens.push(e.tokens.len());
    }
    p.order = order;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_engine::runner::BatchEntry;

    fn entry(seq_id: u64, tokens: Vec<u32>, start_pos: usize, block_table: Vec<u32>) -> BatchEntry {
        BatchEntry {
            seq_id,
            tokens,
            start_pos,
            block_table,
            want_logits: true,
        }
    }

    #[test]
    fn decode_rows_come_first_and_last_rows_map_back() {
        let batch = ForwardBatch {
            entries: vec![
                entry(1, vec![5, 6, 7], 0, vec![3]), // prefill
                entry(2, vec![8], 4, vec![0, 2]),    // decode at position 4
                entry(3, vec![9, 10], 2, vec![1]),   // prefill chunk
                entry(4, vec![11], 0, vec![4]),      // one-token prompt: decode kernel
            ],
            block_copies: vec![],
        };
        let p = plan(&batch, 100, 64, 5, 4).unwrap();
        assert_eq!(p.order, vec![1, 3, 0, 2]);
        assert_eq!(p.num_decode, 2);
        assert_eq!(p.tokens, vec![8, 11, 5, 6, 7, 9, 10]);
        assert_eq!(p.positions, vec![4, 0, 0, 1, 2, 2, 3]);
        // Position 4 of seq 2 is block_table[1] = 2, offset 0 → slot 8; seq 3 lives in block 1.
        assert_eq!(p.slots, vec![8, 16, 12, 13, 14, 6, 7]);
        assert_eq!(p.context_lens, vec![5, 1, 3, 4]);
        assert_eq!(p.query_lens, vec![1, 1, 3, 2]);
        assert_eq!(p.last_row, vec![4, 0, 6, 1]);
    }

    #[test]
    fn bad_entries_are_errors_naming_the_problem() {
        let bad = |e: BatchEntry| {
            plan(
                &ForwardBatch {
                    entries: vec![e],
                    block_copies: vec![],
                },
                100,
                8,
                4,
                4,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(bad(entry(1, vec![], 0, vec![0])).contains("no tokens"));
        assert!(bad(entry(1, vec![1; 9], 0, vec![0, 1, 2])).contains("beyond context length"));
        assert!(bad(entry(1, vec![1; 5], 0, vec![0])).contains("block_table has 1 blocks"));
        assert!(bad(entry(1, vec![1], 0, vec![4])).contains("block 4 >= 4"));
        assert!(bad(entry(1, vec![100], 0, vec![0])).contains("out of vocabulary"));
    }
}
