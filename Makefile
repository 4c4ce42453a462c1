# lazyblock: `make run` and `make test` are the two commands of the README.
#   make build   install what is missing, build build/lazyblock and the tests
#   make run     build, then run the main job: bench fetch on both profiles
#   make test    build, run every test, then again under ASan+UBSan and TSan
#   make clean   remove the build trees

JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
SANITIZER_ENV = ASAN_OPTIONS=halt_on_error=1:detect_leaks=1 \
                UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
                TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1

.PHONY: deps build run test test-plain test-asan test-tsan clean

deps:
	@scripts/install-deps

# configure DIR BUILD_TYPE EXTRA_FLAGS
define configure
	@cmake -S . -B $(1) -DCMAKE_BUILD_TYPE=$(2) $(3) $(CMAKE_FLAGS) >/dev/null
endef

build: deps
	@echo "== build (build/)"
	$(call configure,build,RelWithDebInfo,)
	@cmake --build build -j $(JOBS)

run: build
	@echo "== lazyblock bench fetch, simulated GCS"
	@build/lazyblock bench fetch --profile gcs --strategy full,streaming,split --iterations 20
	@echo
	@echo "== lazyblock bench fetch, simulated NFS"
	@build/lazyblock bench fetch --profile nfs --strategy full,streaming,split --iterations 20

test: test-plain test-asan test-tsan

test-plain: build
	@echo "== tests (build/)"
	@ctest --test-dir build --output-on-failure -j $(JOBS)

test-asan: deps
	@echo "== tests under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)"
	$(call configure,build-asan,Debug,-DLAZYBLOCK_SANITIZE=address$(,)undefined)
	@cmake --build build-asan -j $(JOBS)
	@$(SANITIZER_ENV) ctest --test-dir build-asan --output-on-failure -j $(JOBS)

test-tsan: deps
	@echo "== tests under ThreadSanitizer (build-tsan/)"
	$(call configure,build-tsan,RelWithDebInfo,-DLAZYBLOCK_SANITIZE=thread)
	@cmake --build build-tsan -j $(JOBS)
	@$(SANITIZER_ENV) ctest --test-dir build-tsan --output-on-failure -j $(JOBS)

clean:
	rm -rf build build-asan build-tsan

, := ,
