#include "sentencepiece_model.h"

#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace agentflan::spm {
namespace {

// Protobuf wire types.
enum WireType : uint32_t {
  kVarint = 0,
  kFixed64 = 1,
  kLengthDelimited = 2,
  kStartGroup = 3,
  kEndGroup = 4,
  kFixed32 = 5,
};

const char* wire_type_name(uint32_t wire) {
  switch (wire) {
    case kVarint:
      return "varint";
    case kFixed64:
      return "fixed64";
    case kLengthDelimited:
      return "length-delimited";
    case kStartGroup:
      return "start-group";
    case kEndGroup:
      return "end-group";
    case kFixed32:
      return "fixed32";
    default:
      return "invalid";
  }
}

// Cursor over one message's bytes. `base` is the offset of `data` in the file,
// so errors point at file offsets; `path` names the message ("ModelProto.pieces[3]").
class Reader {
 public:
  Reader(std::string_view data, size_t base, const std::string& origin, std::string path)
      : data_(data), base_(base), origin_(origin), path_(std::move(path)) {}

  bool done() const { return pos_ >= data_.size(); }

  // Reads a field key; returns false at the end of the message.
  bool next_field(uint32_t& field, uint32_t& wire) {
    if (done()) return false;
    field_start_ = pos_;
    const uint64_t key = varint();
    wire = static_cast<uint32_t>(key & 7);
    if (wire > kFixed32) fail("invalid wire type " + std::to_string(wire));
    if ((key >> 3) == 0 || (key >> 3) > 0x1FFFFFFF)
      fail("invalid field number " + std::to_string(key >> 3));
    field = static_cast<uint32_t>(key >> 3);
    return true;
  }

  uint64_t varint() {
    uint64_t value = 0;
    for (int shift = 0; shift < 70; shift += 7) {
      if (pos_ >= data_.size()) fail("truncated varint");
      const uint8_t byte = static_cast<uint8_t>(data_[pos_++]);
      if (shift == 63 && byte > 1) fail("varint overflows 64 bits");
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if (byte < 0x80) return value;
    }
    fail("varint longer than 10 bytes");
  }

  std::string_view bytes() {
    const uint64_t len = varint();
    if (len > data_.size() - pos_) {
      fail("length " + std::to_string(len) + " runs past the end of the message (" +
           std::to_string(data_.size() - pos_) + " bytes left)");
    }
    const std::string_view out = data_.substr(pos_, static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return out;
  }

  // A nested message's reader; offsets keep pointing into the file.
  Reader sub(const std::string& name) {
    const std::string_view body = bytes();
    return Reader(body, base_ + static_cast<size_t>(body.data() - data_.data()), origin_,
                  path_ + "." + name);
  }

  uint32_t fixed32() {
    if (data_.size() - pos_ < 4) fail("truncated fixed32");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i)
      v |= static_cast<uint32_t>(static_cast<uint8_t>(data_[pos_ + i])) << (8 * i);
    pos_ += 4;
    return v;
  }

  float float32() {
    const uint32_t bits = fixed32();
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }

  // Skips one field of the given wire type (groups nest).
  void skip(uint32_t wire, uint32_t field) {
    switch (wire) {
      case kVarint:
        varint();
        return;
      case kFixed64:
        if (data_.size() - pos_ < 8) fail("truncated fixed64");
        pos_ += 8;
        return;
      case kLengthDelimited:
        bytes();
        return;
      case kFixed32:
        fixed32();
        return;
      case kStartGroup: {
        uint32_t inner_field, inner_wire;
        while (next_field(inner_field, inner_wire)) {
          if (inner_wire == kEndGroup) {
            if (inner_field != field) fail("end-group tag does not match its start-group tag");
            return;
          }
          skip(inner_wire, inner_field);
        }
        fail("unterminated group");
      }
      default:
        fail("unexpected end-group tag");  // next_field() let only kEndGroup through
    }
  }

  // Checks that a known field arrived with the wire type its declaration implies.
  void expect(uint32_t wire, uint32_t expected, const char* field_name) const {
    if (wire != expected) {
      fail(std::string("field '") + field_name + "' has wire type " + wire_type_name(wire) +
           ", expected " + wire_type_name(expected));
    }
  }

  [[noreturn]] void fail(const std::string& what) const {
    std::ostringstream msg;
    msg << origin_ << ": not a valid SentencePiece model: " << what << " in " << path_
        << " at byte offset " << (base_ + field_start_);
    throw std::invalid_argument(msg.str());
  }

 private:
  std::string_view data_;
  size_t base_;
  const std::string& origin_;
  std::string path_;
  size_t pos_ = 0;
  size_t field_start_ = 0;
};

bool read_bool(Reader& r, uint32_t wire, const char* name) {
  r.expect(wire, kVarint, name);
  return r.varint() != 0;
}

// proto int32 travels as a sign-extended 64-bit varint.
int32_t read_int32(Reader& r, uint32_t wire, const char* name) {
  r.expect(wire, kVarint, name);
  return static_cast<int32_t>(static_cast<int64_t>(r.varint()));
}

std::string read_string(Reader& r, uint32_t wire, const char* name) {
  r.expect(wire, kLengthDelimited, name);
  return std::string(r.bytes());
}

void parse_piece(Reader r, Piece& piece) {
  uint32_t field, wire;
  while (r.next_field(field, wire)) {
    switch (field) {
      case 1:
        piece.text = read_string(r, wire, "piece");
        break;
      case 2:
        r.expect(wire, kFixed32, "score");
        piece.score = r.float32();
        break;
      case 3: {
        const int32_t type = read_int32(r, wire, "type");
        if (type < 1 || type > 6) r.fail("unknown piece type " + std::to_string(type));
        piece.type = static_cast<PieceType>(type);
        break;
      }
      default:
        r.skip(wire, field);
    }
  }
}

void parse_trainer_spec(Reader r, TrainerSpec& spec) {
  uint32_t field, wire;
  while (r.next_field(field, wire)) {
    switch (field) {
      case 3: {
        const int32_t type = read_int32(r, wire, "model_type");
        if (type < 1 || type > 4) r.fail("unknown model_type " + std::to_string(type));
        spec.model_type = static_cast<ModelType>(type);
        break;
      }
      case 24:
        spec.treat_whitespace_as_suffix = read_bool(r, wire, "treat_whitespace_as_suffix");
        break;
      case 35:
        spec.byte_fallback = read_bool(r, wire, "byte_fallback");
        break;
      case 44:
        spec.unk_surface = read_string(r, wire, "unk_surface");
        break;
      case 45:
        spec.unk_piece = read_string(r, wire, "unk_piece");
        break;
      case 46:
        spec.bos_piece = read_string(r, wire, "bos_piece");
        break;
      case 47:
        spec.eos_piece = read_string(r, wire, "eos_piece");
        break;
      case 48:
        spec.pad_piece = read_string(r, wire, "pad_piece");
        break;
      default:
        r.skip(wire, field);
    }
  }
}

void parse_normalizer_spec(Reader r, NormalizerSpec& spec) {
  uint32_t field, wire;
  while (r.next_field(field, wire)) {
    switch (field) {
      case 1:
        spec.name = read_string(r, wire, "name");
        break;
      case 2:
        spec.precompiled_charsmap = read_string(r, wire, "precompiled_charsmap");
        break;
      case 3:
        spec.add_dummy_prefix = read_bool(r, wire, "add_dummy_prefix");
        break;
      case 4:
        spec.remove_extra_whitespaces = read_bool(r, wire, "remove_extra_whitespaces");
        break;
      case 5:
        spec.escape_whitespaces = read_bool(r, wire, "escape_whitespaces");
        break;
      default:
        r.skip(wire, field);
    }
  }
}

}  // namespace

const char* model_type_name(ModelType type) {
  switch (type) {
    case ModelType::kUnigram:
      return "UNIGRAM";
    case ModelType::kBpe:
      return "BPE";
    case ModelType::kWord:
      return "WORD";
    case ModelType::kChar:
      return "CHAR";
  }
  return "UNKNOWN";
}

ModelProto parse_model_proto(std::string_view data, const std::string& origin) {
  if (data.empty()) {
    throw std::invalid_argument(origin + ": not a valid SentencePiece model: the file is empty");
  }
  ModelProto model;
  Reader r(data, 0, origin, "ModelProto");
  uint32_t field, wire;
  while (r.next_field(field, wire)) {
    switch (field) {
      case 1: {
        r.expect(wire, kLengthDelimited, "pieces");
        model.pieces.emplace_back();
        parse_piece(r.sub("pieces[" + std::to_string(model.pieces.size() - 1) + "]"),
                    model.pieces.back());
        break;
      }
      case 2:
        r.expect(wire, kLengthDelimited, "trainer_spec");
        model.has_trainer_spec = true;
        parse_trainer_spec(r.sub("trainer_spec"), model.trainer_spec);
        break;
      case 3:
        r.expect(wire, kLengthDelimited, "normalizer_spec");
        parse_normalizer_spec(r.sub("normalizer_spec"), model.normalizer_spec);
        break;
      case 5:
        r.expect(wire, kLengthDelimited, "denormalizer_spec");
        model.has_denormalizer_spec = true;
        parse_normalizer_spec(r.sub("denormalizer_spec"), model.denormalizer_spec);
        break;
      default:
        r.skip(wire, field);
    }
  }
  if (model.pieces.empty()) {
    throw std::invalid_argument(origin + ": not a valid SentencePiece model: it has no pieces");
  }
  return model;
}

ModelProto load_model_proto(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::invalid_argument(path + ": cannot open the tokenizer model file");
  std::ostringstream buffer;
  buffer << file.rdbuf();
  if (file.bad())
    throw std::invalid_argument(path + ": error while reading the tokenizer model file");
  return parse_model_proto(buffer.str(), path);
}

}  // namespace agentflan::spm
