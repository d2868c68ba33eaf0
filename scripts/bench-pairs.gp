# Chart of BENCHMARKS.md's concurrency section; scripts/bench.sh calls it with datafile, outfile
# and subtitle set. Data (examples/bench/pairs_report.rs): index 0 Gbit/s, index 1 CPU-s/GiB of the
# whole machine, index 2 the same less other processes (a shared machine's noise); each
# row N, then median min max per contender in this order:
#   0 direct, 1 relay-kernel, 2 relay-kernel-after0, 3 relay-userspace,
#   4 proxy-kernel, 5 proxy-kernel-after0, 6 proxy-userspace, 7 haproxy-threads
set terminal svg size 1200,1250 dynamic font "sans,12" background "white"
set output outfile
set datafile missing NaN
set multiplot layout 3,2 title "skrelay: N concurrent one-way bulk pairs, medians, bars min-max (".subtitle.")" font ",14"
set logscale x 2
set xtics 4
set xlabel "concurrent pairs"
set grid xtics ytics
set key outside below font ",10" maxrows 3
set offsets graph 0.05, graph 0.05, 0, 0
med(j) = 2 + 3 * j
col(j) = j == 0 ? "#555555" : j == 1 || j == 4 ? "#1f77b4" : j == 2 || j == 5 ? "#2ca02c" : j == 3 || j == 6 ? "#ff7f0e" : "#d62728"
name(j) = word("direct kernel 'kernel, --kernel-after 0' userspace kernel 'kernel, --kernel-after 0' userspace 'HAProxy, threads = CPUs, splice'", j + 1)
set yrange [0:*]
set title "relay: aggregate Gbit/s (higher is better)"
plot for [j in "0 1 2 3"] datafile index 0 using 1:med(j+0):(column(med(j+0)+1)):(column(med(j+0)+2)) \
     with yerrorlines lw 2 pt 7 lc rgb col(j+0) title name(j+0)
set title "proxy: aggregate Gbit/s (higher is better)"
plot for [j in "0 4 5 6 7"] datafile index 0 using 1:med(j+0):(column(med(j+0)+1)):(column(med(j+0)+2)) \
     with yerrorlines lw 2 pt 7 lc rgb col(j+0) title name(j+0)
set title "relay: CPU-s per GiB, whole machine (lower is better)"
plot for [j in "0 1 2 3"] datafile index 1 using 1:med(j+0):(column(med(j+0)+1)):(column(med(j+0)+2)) \
     with yerrorlines lw 2 pt 7 lc rgb col(j+0) title name(j+0)
set title "proxy: CPU-s per GiB, whole machine (lower is better)"
plot for [j in "0 4 5 6 7"] datafile index 1 using 1:med(j+0):(column(med(j+0)+1)):(column(med(j+0)+2)) \
     with yerrorlines lw 2 pt 7 lc rgb col(j+0) title name(j+0)
set title "relay: CPU-s per GiB, less other processes (lower is better)"
plot for [j in "0 1 2 3"] datafile index 2 using 1:med(j+0):(column(med(j+0)+1)):(column(med(j+0)+2)) \
     with yerrorlines lw 2 pt 7 lc rgb col(j+0) title name(j+0)
set title "proxy: CPU-s per GiB, less other processes (lower is better)"
plot for [j in "0 4 5 6 7"] datafile index 2 using 1:med(j+0):(column(med(j+0)+1)):(column(med(j+0)+2)) \
     with yerrorlines lw 2 pt 7 lc rgb col(j+0) title name(j+0)
unset multiplot
