// Reader for SentencePiece `.model` files: a serialized `ModelProto`
// (protobuf wire format, proto2). Only the fields the tokenizer needs are kept;
// every other field is skipped, so files written by newer SentencePiece
// versions still load. No protobuf or sentencepiece library is involved.
//
// Malformed input (truncated varints, lengths past the end, bad wire types,
// unknown enum values) throws std::invalid_argument naming the file, the
// message path and the byte offset.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace agentflan::spm {

// ModelProto.SentencePiece.Type; the numbers are the wire values.
enum class PieceType : uint8_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

// TrainerSpec.ModelType; the numbers are the wire values.
enum class ModelType : int32_t { kUnigram = 1, kBpe = 2, kWord = 3, kChar = 4 };

const char* model_type_name(ModelType type);

struct Piece {
  std::string text;
  float score = 0.0f;
  PieceType type = PieceType::kNormal;
};

// Defaults are the proto defaults, which apply when a field is absent.
struct TrainerSpec {
  ModelType model_type = ModelType::kUnigram;
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  // SentencePiece finds the special ids by looking these pieces up (bos_id()
  // is the id of `bos_piece` when that piece is a control piece), so the
  // tokenizer does the same rather than trusting the numeric id fields.
  std::string unk_piece = "<unk>";
  std::string bos_piece = "<s>";
  std::string eos_piece = "</s>";
  std::string pad_piece = "<pad>";
  std::string unk_surface = " \xE2\x81\x87 ";  // " ⁇ ", what decode() prints for <unk>
};

struct NormalizerSpec {
  std::string name;
  std::string precompiled_charsmap;  // Darts double-array trie + replacement pool
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};

struct ModelProto {
  std::vector<Piece> pieces;
  bool has_trainer_spec = false;  // SentencePiece writes it after the pieces
  TrainerSpec trainer_spec;
  NormalizerSpec normalizer_spec;
  bool has_denormalizer_spec = false;
  NormalizerSpec denormalizer_spec;
};

// Parses a serialized ModelProto. `origin` (usually the file path) prefixes
// every error message.
ModelProto parse_model_proto(std::string_view data, const std::string& origin);

// Reads and parses a `.model` file; a missing or unreadable file throws
// std::invalid_argument too.
ModelProto load_model_proto(const std::string& path);

}  // namespace agentflan::spm
