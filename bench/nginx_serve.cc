// nginx_serve DIR: serves DIR with the tests' nginx (testing::NginxServer:
// static files, and under /shaped/ paced like a cloud object store: 20 ms
// to first byte, then 100 MB/s per response) on a free loopback port;
// prints its URL, then runs until SIGINT or SIGTERM. For bench scripts that
// need the same upstream as the tests.
#include <signal.h>

#include <cstdio>

#include "testing/nginx_server.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: nginx_serve DIR\n");
    return 2;
  }
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  auto server = lazyblock::testing::NginxServer::start(argv[1]);
  if (!server) {
    std::fprintf(stderr, "nginx_serve: %s\n", server.status().to_string().c_str());
    return 1;
  }
  std::printf("%s\n", (*server)->url().c_str());
  std::fflush(stdout);
  int signal = 0;
  sigwait(&signals, &signal);
  return 0;
}
