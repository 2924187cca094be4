set +e
mkdir -p $OUT
export PYTHONPATH=$PWD
T0=$(date +%s)
timeout 150 python benchmarks/bench_attention.py > $OUT/bench_attention.log 2>&1
T1=$(date +%s)
timeout 240 python benchmarks/tune_attention.py > $OUT/tune_attention.log 2>&1
T2=$(date +%s)
timeout 195 python benchmarks/tune_planning.py > $OUT/tune_planning.log 2>&1
T3=$(date +%s)
echo "bench_attention $((T1-T0)) s, tune_attention $((T2-T1)) s, tune_planning $((T3-T2)) s"
tail -12 $OUT/bench_attention.log | cut -c1-400
tail -25 $OUT/tune_attention.log | cut -c1-300
tail -25 $OUT/tune_planning.log | cut -c1-300
