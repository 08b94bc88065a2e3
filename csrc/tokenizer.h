// A SentencePiece-exact BPE tokenizer: for any BPE `.model` file, encode()
// returns the ids `sentencepiece.SentencePieceProcessor.encode(text)` returns
// and decode() the text its decode() returns, without linking sentencepiece.
//
// Encoding is normalization (the precompiled charsmap or identity, dummy
// prefix, whitespace folding and escaping to U+2581) followed by
// SentencePiece's BPE: symbols start as single characters (user-defined pieces
// as frozen whole units) and the adjacent pair whose merged string is a piece
// with the highest score is merged first, the leftmost on ties.
//
// Content mode (allow_special = false): user-defined pieces written in the text
// are not matched; their characters are normalized and run through BPE (and byte
// fallback) like any other text, so the output never holds a user-defined id.
// Control pieces (<s>, </s>, <unk>) are never matched in either mode, as in
// SentencePiece, and BPE merges only ever produce NORMAL pieces, so in content
// mode the ids are NORMAL, byte or (without byte fallback) unknown pieces only.
// A one-character user-defined piece's character is then not a BPE symbol and
// falls back to its bytes (or <unk>).
//
// Speed comes from splitting the normalized text into segments that no merge
// can cross (see `SegmentRule` in tokenizer.cpp for the rule and its proof),
// caching segment -> ids per worker, and running BPE without allocation.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <pybind11/pybind11.h>

#include "sentencepiece_model.h"

namespace agentflan::tokenizer {

struct Workspace;  // per-call scratch buffers and the segment cache
class BpeModel;    // pieces, merge rules and the segmentation rule
class Normalizer;

// Result of Tokenizer::encode_batch: the ids of all texts back to back, and
// offsets (n + 1 entries): text i's ids are ids[offsets[i] .. offsets[i + 1]).
struct EncodedBatch {
  std::unique_ptr<int32_t[]> ids;  // n_ids entries; a bare array so it is never zero-filled
  size_t n_ids = 0;
  std::vector<int64_t> offsets;
};

// Per-call encoding switches; the defaults are SentencePiece's encoding.
struct EncodeOptions {
  // Off: user-defined pieces in the text are not matched (content mode, above).
  bool allow_special = true;
  // Off: no dummy prefix (or suffix) even if the model adds one, as for text that
  // continues a line; SentencePiece has no such switch.
  bool add_dummy_prefix = true;
};

// encode_batch hands out texts in runs of at least this many bytes.
inline constexpr size_t kBatchGrainBytes = size_t{1} << 16;

class Tokenizer {
 public:
  // Loads a `.model` file. Throws std::invalid_argument for a missing or
  // corrupt file and for models that are not BPE.
  explicit Tokenizer(const std::string& path);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Appends the ids of `text` to `out` (no BOS/EOS). Thread-safe.
  void encode(std::string_view text, std::vector<int32_t>& out, EncodeOptions options = {}) const;

  // Encodes texts[0..n) over `num_threads` threads (0 = all cores). Thread-safe.
  EncodedBatch encode_batch(const std::string_view* texts, size_t n, int num_threads,
                            EncodeOptions options = {}) const;

  // SentencePiece's decode; throws std::out_of_range for an id outside the vocabulary.
  std::string decode(const int64_t* ids, size_t n) const;

  // The normalized text BPE runs on (U+2581 for spaces, dummy prefix, ...).
  std::string normalize(std::string_view text, EncodeOptions options = {}) const;

  int piece_to_id(std::string_view piece) const;  // unk_id() when absent
  const std::string& id_to_piece(int id) const;   // throws std::out_of_range
  int vocab_size() const;
  int unk_id() const { return unk_id_; }
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }
  int pad_id() const { return pad_id_; }
  // True when the model allows the segment split + cache fast path.
  bool segmented() const;
  // The parsed model file (pieces with scores and types, trainer and normalizer settings).
  const spm::ModelProto& model() const { return model_; }

 private:
  class WorkspaceLease;

  void encode_with(std::string_view text, EncodeOptions options, Workspace& ws,
                   std::vector<int32_t>& out) const;

  std::string path_;
  spm::ModelProto model_;
  std::unique_ptr<BpeModel> bpe_;
  std::unique_ptr<Normalizer> normalizer_;       // keeps user-defined pieces whole
  std::unique_ptr<Normalizer> text_normalizer_;  // normalizes their characters too
  std::unique_ptr<Normalizer> denormalizer_;  // null unless the model has one
  int unk_id_ = -1, bos_id_ = -1, eos_id_ = -1, pad_id_ = -1;

  // Idle workspaces; a call borrows one so that warm caches survive across
  // calls without thread_local state tied to one Tokenizer's lifetime.
  mutable std::mutex pool_mutex_;
  mutable std::vector<std::unique_ptr<Workspace>> pool_;
};

// Adds the Tokenizer class to the extension module.
void register_tokenizer(pybind11::module_& m);

}  // namespace agentflan::tokenizer
