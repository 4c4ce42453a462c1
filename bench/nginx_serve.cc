// nginx_serve [--tls] DIR: serves DIR with the tests' nginx (testing::NginxServer:
// static files, and under /shaped/ paced like a cloud object store: 20 ms
// to first byte, then 100 MB/s per response) on a free loopback port;
// prints its URL, then runs until SIGINT or SIGTERM. With --tls it serves
// https (HTTP/2 offered) with a certificate for localhost from a CA made for
// the run, and prints the CA's certificate file on a second line. For bench
// scripts that need the same upstream as the tests.
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <optional>

#include "testing/nginx_server.h"
#include "testing/scratch_dir.h"

int main(int argc, char** argv) {
  const bool tls = argc == 3 && std::strcmp(argv[1], "--tls") == 0;
  if (argc != 2 && !tls) {
    std::fprintf(stderr, "usage: nginx_serve [--tls] DIR\n");
    return 2;
  }
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  using namespace lazyblock;
  std::optional<testing::ScratchDir> certificates_dir;
  testing::NginxOptions options;
  if (tls) {
    Result<testing::ScratchDir> dir = testing::ScratchDir::create();
    if (!dir) {
      std::fprintf(stderr, "nginx_serve: %s\n", dir.status().to_string().c_str());
      return 1;
    }
    certificates_dir = std::move(dir).value();
    Result<testing::TestCertificates> made =
        testing::TestCertificates::make(certificates_dir->path(), {"localhost"});
    if (!made) {
      std::fprintf(stderr, "nginx_serve: %s\n", made.status().to_string().c_str());
      return 1;
    }
    options.tls = *made;
  }
  auto server = testing::NginxServer::start(argv[argc - 1], options);
  if (!server) {
    std::fprintf(stderr, "nginx_serve: %s\n", server.status().to_string().c_str());
    return 1;
  }
  std::printf("%s\n", (*server)->url(tls ? "localhost" : "127.0.0.1").c_str());
  if (tls) std::printf("%s\n", options.tls->ca.c_str());
  std::fflush(stdout);
  int signal = 0;
  sigwait(&signals, &signal);
  return 0;
}
