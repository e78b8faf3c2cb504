// Prototype native data plane for the Kiln gateway (benchmark only, not shipped).
// A generic (bytes in, bytes out) gRPC proxy on gRPC C++'s callback API: for each ModelInfer it
// reads model_name from the request bytes (top-level protobuf walk), picks a variant by weight,
// appends the variant's model_name/model_version (protobuf keeps the last value), calls the
// upstream with the client's deadline and answers with the upstream's bytes plus a `kiln-variant`
// trailer -- the Python gateway's hot path without its metrics and admin plane.
// Two transports: "callback" (gRPC's callback API; its threads) and "cq" (the async completion-queue
// API driven by one thread: no hand-off between threads per call).
// Usage: kiln_native_proxy LISTEN_HOST:PORT UPSTREAM_HOST:PORT [callback|cq]
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <csignal>
#include <cstdint>
#include <iostream>
#include <string>
#include <thread>

namespace {

// Value of the last top-level field 1 (string) of a protobuf message; empty when absent/malformed.
std::string ReadModelName(const std::string& b) {
  std::string name;
  size_t i = 0;
  auto varint = [&](uint64_t* out) {
    uint64_t v = 0;
    for (int shift = 0; i < b.size() && shift < 64; shift += 7) {
      uint8_t c = b[i++];
      v |= uint64_t(c & 0x7f) << shift;
      if (!(c & 0x80)) { *out = v; return true; }
    }
    return false;
  };
  while (i < b.size()) {
    uint64_t key, len;
    if (!varint(&key)) return "";
    switch (key & 7) {
      case 0: if (!varint(&len)) return ""; break;
      case 1: i += 8; break;
      case 5: i += 4; break;
      case 2:
        if (!varint(&len) || i + len > b.size()) return "";
        if ((key >> 3) == 1) name.assign(b, i, len);
        i += len;
        break;
      default: return "";
    }
  }
  return name;
}

void AppendString(std::string* out, int field, const std::string& value) {
  out->push_back(char(field << 3 | 2));
  uint64_t n = value.size();
  while (n >= 0x80) { out->push_back(char(n | 0x80)); n >>= 7; }
  out->push_back(char(n));
  out->append(value);
}

struct Variant { std::string name, model, version; double weight; };
const Variant kVariants[] = {{"a", "", "", 100.0}, {"b", "", "", 0.0}};

thread_local uint64_t rng_state = 0x9E3779B97F4A7C15ull ^ uint64_t(std::hash<std::thread::id>{}(std::this_thread::get_id()));
double Draw() {
  rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
  return double(rng_state >> 11) * (1.0 / 9007199254740992.0);
}

// Build the upstream request: the client's bytes + the chosen variant's name/version fields.
const Variant* Rewrite(const grpc::ByteBuffer& in, grpc::ByteBuffer* out) {
  grpc::Slice slice;
  if (!in.DumpToSingleSlice(&slice).ok()) return nullptr;
  std::string body;
  body.reserve(slice.size() + 128);
  body.assign(reinterpret_cast<const char*>(slice.begin()), slice.size());
  std::string model = ReadModelName(body);
  double draw = Draw() * 100.0, acc = 0.0;
  const Variant* chosen = &kVariants[0];
  for (const auto& v : kVariants) { acc += v.weight; if (draw < acc) { chosen = &v; break; } }
  AppendString(&body, 1, chosen->model.empty() ? model : chosen->model);
  AppendString(&body, 2, chosen->version);
  grpc::Slice s(body);
  *out = grpc::ByteBuffer(&s, 1);
  return chosen;
}

class Proxy final : public grpc::CallbackGenericService {
 public:
  explicit Proxy(std::shared_ptr<grpc::Channel> channel) : stub_(channel) {}

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return new Call(ctx, &stub_);
  }

 private:
  class Call final : public grpc::ServerGenericBidiReactor {
   public:
    Call(grpc::GenericCallbackServerContext* ctx, grpc::GenericStub* stub) : ctx_(ctx), stub_(stub) {
      StartRead(&request_);
    }
    void OnReadDone(bool ok) override {
      if (!ok) { Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message")); return; }
      const Variant* chosen = Rewrite(request_, &upstream_request_);
      if (chosen == nullptr) { Finish(grpc::Status(grpc::StatusCode::INTERNAL, "read")); return; }
      client_.set_deadline(ctx_->deadline());
      ctx_->AddTrailingMetadata("kiln-variant", chosen->name);
      stub_->UnaryCall(&client_, ctx_->method(), grpc::StubOptions(), &upstream_request_, &response_,
                       [this](grpc::Status status) {
                         if (status.ok()) StartWriteAndFinish(&response_, grpc::WriteOptions(), status);
                         else Finish(status);
                       });
    }
    void OnDone() override { delete this; }

   private:
    grpc::GenericCallbackServerContext* ctx_;
    grpc::GenericStub* stub_;
    grpc::ClientContext client_;
    grpc::ByteBuffer request_, upstream_request_, response_;
  };
  grpc::GenericStub stub_;
};

// One proxied call on the completion-queue API; every step's completion comes back to Proceed.
class CqCall {
 public:
  CqCall(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* cq, grpc::GenericStub* stub)
      : service_(service), cq_(cq), stub_(stub), stream_(&ctx_) {
    service_->RequestCall(&ctx_, &stream_, cq_, cq_, this);
  }
  void Proceed(bool ok) {
    switch (state_) {
      case kRequested:
        if (!ok) { delete this; return; }  // shutting down
        new CqCall(service_, cq_, stub_);
        state_ = kRead;
        stream_.Read(&request_, this);
        return;
      case kRead: {
        const Variant* chosen = ok ? Rewrite(request_, &upstream_request_) : nullptr;
        if (chosen == nullptr) {
          state_ = kDone;
          stream_.Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message"), this);
          return;
        }
        client_.set_deadline(ctx_.deadline());
        ctx_.AddTrailingMetadata("kiln-variant", chosen->name);
        reader_ = stub_->PrepareUnaryCall(&client_, ctx_.method(), upstream_request_, cq_);
        reader_->StartCall();
        state_ = kUpstream;
        reader_->Finish(&response_, &status_, this);
        return;
      }
      case kUpstream:
        state_ = kDone;
        if (status_.ok()) stream_.WriteAndFinish(response_, grpc::WriteOptions(), status_, this);
        else stream_.Finish(status_, this);
        return;
      case kDone:
        delete this;
    }
  }

 private:
  enum State { kRequested, kRead, kUpstream, kDone } state_ = kRequested;
  grpc::AsyncGenericService* service_;
  grpc::ServerCompletionQueue* cq_;
  grpc::GenericStub* stub_;
  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_;
  grpc::ClientContext client_;
  grpc::ByteBuffer request_, upstream_request_, response_;
  grpc::Status status_;
  std::unique_ptr<grpc::ClientAsyncResponseReader<grpc::ByteBuffer>> reader_;
};

std::atomic<bool> stop{false};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) { std::cerr << "usage: kiln_native_proxy LISTEN UPSTREAM [callback|cq]\n"; return 2; }
  const bool cq_mode = argc == 4 && std::string(argv[3]) == "cq";
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  args.SetInt("grpc.enable_retries", 0);
  auto channel = grpc::CreateCustomChannel(argv[2], grpc::InsecureChannelCredentials(), args);
  Proxy proxy(channel);
  grpc::GenericStub stub(channel);
  grpc::AsyncGenericService async_service;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(argv[1], grpc::InsecureServerCredentials());
  builder.SetMaxReceiveMessageSize(256 << 20);
  builder.SetMaxSendMessageSize(256 << 20);
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  if (cq_mode) {
    builder.RegisterAsyncGenericService(&async_service);
    cq = builder.AddCompletionQueue();
  } else {
    builder.RegisterCallbackGenericService(&proxy);
  }
  auto server = builder.BuildAndStart();
  if (!server) { std::cerr << "cannot listen on " << argv[1] << "\n"; return 1; }
  std::signal(SIGTERM, [](int) { stop = true; });
  std::signal(SIGINT, [](int) { stop = true; });
  std::thread watcher([&] {
    while (!stop) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
    if (cq) cq->Shutdown();
  });
  if (cq) {
    new CqCall(&async_service, cq.get(), &stub);
    void* tag;
    bool ok;
    while (cq->Next(&tag, &ok)) static_cast<CqCall*>(tag)->Proceed(ok);
  }
  watcher.join();
  return 0;
}
