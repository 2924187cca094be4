set +e
mkdir -p $OUT
export PYTHONPATH=$PWD
T0=$(date +%s)
timeout 200 python benchmarks/bench_attention.py > $OUT/bench_attention.log 2>&1
T1=$(date +%s)
timeout 230 python -m pytest -q -m gpu tests/test_kernel_attention.py tests/test_kernel_stages.py -rf -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
T2=$(date +%s)
echo "bench_attention $((T1-T0)) s, gpu tests $((T2-T1)) s"
grep "Row(" $OUT/bench_attention.log | cut -c1-420
tail -8 $OUT/gpu_tests.txt
